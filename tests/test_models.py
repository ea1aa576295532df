"""TinyFPN (the seed's network) and torchvision detection models after convert()."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection import fasterrcnn_resnet50_fpn, retinanet_resnet50_fpn
from torchvision.ops import FeaturePyramidNetwork

from fpn_kernels.backends import BACKENDS, available_backends
from fpn_kernels.models import TinyFPN
from fpn_kernels.modules import FusedFPN, convert

CPU = torch.device("cpu")
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5}  # times the output's scale


def cpu_backends(dtype: torch.dtype) -> list[str]:
    """"auto" plus every installed backend that runs ``dtype`` on CPU."""
    return ["auto"] + [
        name for name in available_backends()
        if not BACKENDS[name].not_supported_reasons(CPU, dtype)
    ]


def assert_close_to_scale(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype):
    atol = ATOL[dtype] * max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(got, expected, atol=atol, rtol=0)


# --------------------------------------------------------------------------- TinyFPN


def test_tiny_fpn_shapes_and_layers():
    model = TinyFPN()
    outputs = model(torch.randn(1, 3, 256, 256))
    assert [tuple(t.shape) for t in outputs] == [(1, 32, 32, 32), (1, 32, 64, 64),
                                                 (1, 32, 128, 128)]
    names = {name for name, _ in model.named_children()}
    assert names == {f"{kind}{i}" for kind in ("bottomlayer", "latlayer", "toplayer")
                     for i in (1, 2, 3)}
    assert [model.latlayer1.in_channels, model.latlayer2.in_channels,
            model.latlayer3.in_channels] == [256, 128, 64]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("hw", [(256, 256), (97, 131)], ids=["256x256", "odd"])
def test_tiny_fpn_fused_equals_eager(hw, channels_last, dtype):
    torch.manual_seed(0)
    model = TinyFPN().to(dtype)
    x = torch.randn(1, 3, *hw, dtype=dtype)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(
            memory_format=torch.channels_last)
    model.fused = False
    expected = model(x)
    model.fused = True
    for backend in cpu_backends(dtype):
        model.backend = backend
        for got, exp in zip(model(x), expected, strict=True):
            assert got.shape == exp.shape
            assert_close_to_scale(got, exp, dtype)


def test_tiny_fpn_gradients_fused_equal_eager():
    torch.manual_seed(0)
    eager = TinyFPN(fused=False).double()
    x = torch.randn(2, 3, 67, 90, dtype=torch.float64)
    sum(t.square().sum() for t in eager(x)).backward()
    for backend in cpu_backends(torch.float64):
        fused = TinyFPN(backend=backend).double()
        fused.load_state_dict(eager.state_dict())
        sum(t.square().sum() for t in fused(x)).backward()
        for (name, p), q in zip(eager.named_parameters(), fused.parameters(), strict=True):
            torch.testing.assert_close(q.grad, p.grad, atol=1e-9, rtol=1e-10,
                                       msg=lambda m, n=name, b=backend: f"{b}, {n}: {m}")


def test_tiny_fpn_fused_calls_the_op(monkeypatch):
    import fpn_kernels.models.tiny_fpn as tiny_fpn

    calls = []
    real_op = tiny_fpn.upsample_add_conv1x1
    monkeypatch.setattr(tiny_fpn, "upsample_add_conv1x1",
                        lambda *a, **k: calls.append(k["backend"]) or real_op(*a, **k))
    x = torch.randn(1, 3, 32, 32)
    TinyFPN(fused=False)(x)
    assert calls == []
    TinyFPN(backend="eager")(x)
    assert calls == ["eager", "eager"]


# --------------------------------------------------------------------------- detection models

# Small images and few proposals keep this fast; score thresholds of 0 make random-weight
# models return detections (checked below, so an empty comparison cannot pass).
DETECTORS = {
    "fasterrcnn_resnet50_fpn": lambda: fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=192, box_score_thresh=0.0,
        rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, box_detections_per_img=40,
    ),
    "retinanet_resnet50_fpn": lambda: retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=128, max_size=192, score_thresh=0.0,
        topk_candidates=100, detections_per_img=40,
    ),
}


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detection_model_same_detections_after_convert(name):
    torch.manual_seed(0)
    # float64: detections go through top-k and NMS, where float32 rounding differences between
    # two correct implementations could reorder near-ties.
    model = DETECTORS[name]().double().eval()
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 200, 256, generator=gen, dtype=torch.float64),
              torch.rand(3, 180, 232, generator=gen, dtype=torch.float64)]
    with torch.no_grad():
        expected = model(images)
    assert convert(model) is model
    assert type(model.backbone.fpn) is FusedFPN
    assert not any(type(m) is FeaturePyramidNetwork for m in model.modules())
    with torch.no_grad():
        got = model(images)
    for exp, res in zip(expected, got, strict=True):
        assert len(exp["boxes"]) > 0
        torch.testing.assert_close(res["labels"], exp["labels"], atol=0, rtol=0)
        torch.testing.assert_close(res["boxes"], exp["boxes"], atol=1e-8, rtol=0)
        torch.testing.assert_close(res["scores"], exp["scores"], atol=1e-10, rtol=0)
