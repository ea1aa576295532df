"""convert() and FusedMMDetFPN against the real mmdet 3.3.0 ``mmdet.models.necks.FPN``.

mmcv-lite has no compiled ``mmcv._ext``; tests/_mmcv_stub.py stands in for it so that
``import mmdet.models`` works (FPN calls no compiled op; the stand-in raises if anything does).
"""

from __future__ import annotations

import copy
import io
import math
import os
import warnings

import pytest
import torch
from _mmcv_stub import install as install_mmcv_stub
from _neck_checks import assert_same_grad, assert_same_state, loss
from conftest import assert_close
from test_modules import cpu_backends, one_thread, randomize_  # noqa: F401  (one_thread: fixture)
from torch import nn

pytest.importorskip(
    "mmdet",
    reason="mmdet is not installed (the Makefile's test dependencies pin mmengine==0.10.7 "
    "mmdet==3.3.0 mmcv-lite==2.1.0)",
)
install_mmcv_stub()
import mmdet  # noqa: E402
import mmdet.models  # noqa: E402, F401  (registers the models; fails loudly, never skips)
from mmdet.models.necks import FPN, PAFPN  # noqa: E402
from mmdet.registry import MODELS  # noqa: E402

import fpn_kernels.frameworks.mmdet as fw  # noqa: E402
from fpn_kernels import convert  # noqa: E402
from fpn_kernels.frameworks import ConversionWarning, convert_with_report  # noqa: E402
from fpn_kernels.frameworks.mmdet import FusedMMDetFPN  # noqa: E402

IN_CHANNELS = [4, 6, 8, 10]
OUT_CHANNELS = 6
ODD = [(37, 50), (19, 25), (10, 13), (5, 7)]  # ceil halving, as a stride-2 backbone makes them
EVEN = [(40, 48), (20, 24), (10, 12), (5, 6)]  # exact doubling: what scale_factor=2 needs


def test_installed_versions():
    import mmcv
    import mmengine

    assert (mmdet.__version__, mmengine.__version__, mmcv.__version__) == (
        "3.3.0", "0.10.7", "2.1.0"
    )


def make_inputs(sizes, dtype=torch.float64, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(2, c, *hw, generator=gen, dtype=dtype).requires_grad_(requires_grad)
        for c, hw in zip(IN_CHANNELS, sizes, strict=True)
    )


def make_neck(dtype=torch.float64, training=False, **cfg) -> FPN:
    torch.manual_seed(0)
    cfg.setdefault("num_outs", 4)
    neck = FPN(IN_CHANNELS, OUT_CHANNELS, **cfg)
    randomize_(neck)  # non-trivial biases and norms (a fresh BatchNorm is the identity)
    return neck.to(dtype).train(training)


@pytest.fixture
def fused_calls(monkeypatch):
    """The backends of every fused op call FusedMMDetFPN makes."""
    calls = []
    real_op = fw.upsample_add_conv1x1

    def counting_op(*args, **kwargs):
        calls.append(kwargs["backend"])
        return real_op(*args, **kwargs)

    monkeypatch.setattr(fw, "upsample_add_conv1x1", counting_op)
    return calls


def assert_same_forward_backward(reference: nn.Module, fused: nn.Module, sizes, dtype):
    """Outputs, input and parameter gradients and the state afterwards (running statistics)."""
    x_ref = make_inputs(sizes, dtype, requires_grad=True)
    x_fused = make_inputs(sizes, dtype, requires_grad=True)
    expected, got = reference(x_ref), fused(x_fused)
    assert type(got) is tuple and len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        assert_close(g, e, msg=f"output {i}")
    loss(expected).backward()
    loss(got).backward()
    for i, (g, e) in enumerate(zip(x_fused, x_ref, strict=True)):
        assert_same_grad(g, e, 10, f"grad of input {i}")  # None below start_level
    assert_same_state(reference, fused, grad_scale=math.sqrt(2 * sizes[0][0] * sizes[0][1]))


# name: (FPN arguments, sizes, training, fused merges expected)
CONFIGS = {
    "default": (dict(), ODD, False, 3),
    "maxpool_levels": (dict(num_outs=6), ODD, False, 3),
    "extra_convs_true": (dict(num_outs=5, add_extra_convs=True), ODD, False, 3),
    "on_input_relu": (dict(num_outs=6, add_extra_convs="on_input",
                           relu_before_extra_convs=True), ODD, False, 3),
    "on_lateral": (dict(num_outs=5, add_extra_convs="on_lateral"), ODD, False, 3),
    "on_output": (dict(num_outs=6, add_extra_convs="on_output"), ODD, False, 3),
    "on_output_relu": (dict(num_outs=6, add_extra_convs="on_output",
                            relu_before_extra_convs=True), ODD, False, 3),
    "start_level_1_retinanet": (dict(start_level=1, num_outs=5, add_extra_convs="on_input"),
                                ODD, False, 2),
    "end_level_2": (dict(end_level=2, num_outs=3), ODD, False, 2),
    "start_1_end_2": (dict(start_level=1, end_level=2, num_outs=2), ODD, False, 1),
    "end_level_last": (dict(end_level=3, num_outs=5), ODD, False, 3),
    "bn_eval": (dict(num_outs=5, norm_cfg=dict(type="BN")), ODD, False, 3),
    "bn_train": (dict(num_outs=5, norm_cfg=dict(type="BN")), ODD, True, 0),
    "syncbn_eval": (dict(norm_cfg=dict(type="SyncBN")), ODD, False, 3),
    "bn_train_no_norm_on_lateral": (dict(norm_cfg=dict(type="BN"), no_norm_on_lateral=True),
                                    ODD, True, 3),
    "scale_factor_2": (dict(upsample_cfg=dict(mode="nearest", scale_factor=2)), EVEN, False, 3),
    "scale_factor_only": (dict(upsample_cfg=dict(scale_factor=2.0)), EVEN, False, 3),
    "scale_factor_pair_exact": (dict(upsample_cfg=dict(mode="nearest-exact",
                                                      scale_factor=(2.0, 2))), EVEN, False, 3),
    "nearest_exact_size": (dict(upsample_cfg=dict(mode="nearest-exact")), ODD, False, 3),
    "even_sizes": (dict(num_outs=5), EVEN, False, 3),
    # Left on mmdet's expression (and still exact):
    "groupnorm": (dict(norm_cfg=dict(type="GN", num_groups=2)), ODD, False, 0),
    "relu_activation": (dict(act_cfg=dict(type="ReLU")), ODD, False, 0),
    "bilinear": (dict(upsample_cfg=dict(mode="bilinear", align_corners=False)), ODD, False, 0),
    "nearest_with_align_corners_key": (dict(upsample_cfg=dict(mode="nearest",
                                                             align_corners=None)), ODD, False, 0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_mmdet(name, fused_calls):
    cfg, sizes, training, merges = CONFIGS[name]
    reference = make_neck(training=training, **cfg)
    fused = FusedMMDetFPN.from_mmdet(copy.deepcopy(reference), backend="auto")
    assert_same_forward_backward(reference, fused, sizes, torch.float64)
    assert fused_calls == ["auto"] * merges


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
def test_matches_mmdet_float32_every_backend(backend, fused_calls):
    reference = make_neck(torch.float32, num_outs=5, add_extra_convs="on_input",
                          norm_cfg=dict(type="BN"))
    fused = FusedMMDetFPN.from_mmdet(copy.deepcopy(reference), backend=backend)
    assert_same_forward_backward(reference, fused, ODD, torch.float32)
    assert fused_calls == [backend] * 3


def test_channels_last_and_no_grad(fused_calls):
    reference = make_neck(num_outs=5, norm_cfg=dict(type="BN"))
    fused = FusedMMDetFPN.from_mmdet(reference)  # shares everything with reference
    x = tuple(t.contiguous(memory_format=torch.channels_last) for t in make_inputs(ODD))
    with torch.no_grad():
        expected, got = reference(x), fused(x)
    for g, e in zip(got, expected, strict=True):
        assert_close(g, e)
        assert g.is_contiguous(memory_format=torch.channels_last)
    assert len(fused_calls) == 3


def test_scale_factor_that_misses_the_size_fails_as_mmdet_does(fused_calls):
    """With odd sizes, 2x upsampling does not give the lateral's size: mmdet's add fails."""
    reference = make_neck(upsample_cfg=dict(mode="nearest", scale_factor=2))
    fused = FusedMMDetFPN.from_mmdet(reference)
    with pytest.raises(RuntimeError) as expected:
        reference(make_inputs(ODD))
    with pytest.raises(RuntimeError) as got:
        fused(make_inputs(ODD))
    assert str(got.value) == str(expected.value)
    assert fused_calls == []


def test_hooks_keep_the_lateral_on_mmdets_expression(fused_calls):
    reference = make_neck(num_outs=4)
    fused = FusedMMDetFPN.from_mmdet(copy.deepcopy(reference))
    seen = []
    fused.lateral_convs[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    fused.lateral_convs[1].conv.register_forward_pre_hook(lambda m, i: seen.append("pre"))
    x = make_inputs(ODD)
    for g, e in zip(fused(x), reference(x), strict=True):
        assert_close(g, e)
    # mmdet's order: every lateral before the top-down pass, finest first.
    assert seen == [torch.Size([2, OUT_CHANNELS, *ODD[0]]), "pre"]
    assert len(fused_calls) == 1  # lateral_convs.2 only


def test_spectral_norm_lateral_is_recomputed_as_mmdet_does(fused_calls):
    cfg = dict(num_outs=4)
    torch.manual_seed(0)
    reference = FPN(IN_CHANNELS, OUT_CHANNELS, **cfg).double()
    for m in reference.lateral_convs:
        m.conv = nn.utils.spectral_norm(m.conv)
    fused = FusedMMDetFPN.from_mmdet(copy.deepcopy(reference))
    assert_same_forward_backward(reference.train(), fused.train(), ODD, torch.float64)
    assert fused_calls == []


def test_fold_follows_the_live_batchnorm(fused_calls):
    reference = make_neck(norm_cfg=dict(type="BN"))
    fused = FusedMMDetFPN.from_mmdet(reference)  # shares every parameter and buffer
    x = make_inputs(ODD)
    with torch.no_grad():
        reference.lateral_convs[0].bn.running_var.mul_(3.0)
        reference.lateral_convs[1].conv.weight.mul_(-0.5)
        for g, e in zip(fused(x), reference(x), strict=True):
            assert_close(g, e)
    fused.train()
    fused(x)  # moves the shared running statistics; this forward runs eager
    assert len(fused_calls) == 3
    fused.eval()
    with torch.no_grad():
        for g, e in zip(fused(x), reference.eval()(x), strict=True):
            assert_close(g, e)
    assert len(fused_calls) == 6


# --------------------------------------------------------------------------- the module


def test_fused_module_is_mmdets_fpn_with_the_same_state():
    reference = make_neck(num_outs=5, norm_cfg=dict(type="BN"), add_extra_convs="on_output")
    fused = FusedMMDetFPN.from_mmdet(reference, backend="eager")
    assert isinstance(fused, FPN) and type(reference) is FPN
    assert fused.backend == "eager" and "backend='eager'" in repr(fused)
    assert all(p is q for p, q in zip(fused.parameters(), reference.parameters(), strict=True))
    assert list(fused.state_dict()) == list(reference.state_dict())
    back = fused.to_mmdet()
    assert type(back) is FPN and not hasattr(back, "backend")
    assert all(p is q for p, q in zip(back.parameters(), reference.parameters(), strict=True))

    fresh = FusedMMDetFPN(IN_CHANNELS, OUT_CHANNELS, num_outs=5, norm_cfg=dict(type="BN"),
                          add_extra_convs="on_output").double().eval()
    fresh.load_state_dict(reference.state_dict(), strict=True)
    x = make_inputs(ODD)
    for g, e in zip(fresh(x), reference(x), strict=True):
        assert_close(g, e)


def test_built_from_a_config_by_registry_name():
    neck = MODELS.build(dict(type="FusedMMDetFPN", in_channels=IN_CHANNELS,
                             out_channels=OUT_CHANNELS, num_outs=5, backend="eager"))
    assert type(neck) is FusedMMDetFPN and neck.backend == "eager"


def test_torch_compile_captures_one_graph(fused_calls):
    reference = make_neck(torch.float32, num_outs=5, norm_cfg=dict(type="BN"),
                          add_extra_convs="on_lateral")
    compiled = torch.compile(FusedMMDetFPN.from_mmdet(reference), fullgraph=True,
                             backend="eager")
    x = make_inputs(ODD, torch.float32)
    for g, e in zip(compiled(x), reference(x), strict=True):
        assert_close(g, e)
    assert len(fused_calls) == 3  # traced through the counting wrapper


def test_pickles_whole():
    reference = make_neck(num_outs=5)
    fused = FusedMMDetFPN.from_mmdet(copy.deepcopy(reference))
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is FusedMMDetFPN
    x = make_inputs(ODD)
    for g, e in zip(loaded(x), reference(x), strict=True):
        assert_close(g, e)


def test_bad_arguments_name_themselves():
    with pytest.raises(TypeError, match="neck: expected a mmdet.models.necks.fpn.FPN, got "
                                        "mmdet.models.necks.pafpn.PAFPN"):
        FusedMMDetFPN.from_mmdet(PAFPN(IN_CHANNELS, OUT_CHANNELS, 4))
    with pytest.raises(TypeError, match="neck: expected"):
        FusedMMDetFPN.from_mmdet(nn.Conv2d(1, 1, 1))
    with pytest.raises(ValueError, match="backend"):
        FusedMMDetFPN.from_mmdet(make_neck(), backend="nope")
    with pytest.raises(TypeError, match="backend"):
        FusedMMDetFPN(IN_CHANNELS, OUT_CHANNELS, 4, backend=3)
    with pytest.raises(ValueError, match="backend"):
        convert(make_neck(), backend="nope")


# --------------------------------------------------------------------------- convert()


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.neck = make_neck(num_outs=5)
        self.same_neck = self.neck
        self.heads = nn.ModuleList([
            PAFPN(IN_CHANNELS, OUT_CHANNELS, 4).double(),
            make_neck(upsample_cfg=dict(mode="bilinear")),
            make_neck(norm_cfg=dict(type="GN", num_groups=2)),
            make_neck(norm_cfg=dict(type="BN"), training=True),
        ])


def test_convert_swaps_and_reports(fused_calls):
    model = Detector()
    pafpn, bilinear, gn, bn_train = model.heads
    with pytest.warns(ConversionWarning) as caught:
        assert convert(model, backend="eager") is model
    assert type(model.neck) is FusedMMDetFPN and model.same_neck is model.neck
    assert model.heads[0] is pafpn and model.heads[1] is bilinear
    assert type(model.heads[2]) is FusedMMDetFPN and type(model.heads[3]) is FusedMMDetFPN
    messages = [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in caught)  # points at the caller
    assert len(messages) == 4, messages
    assert ("fpn_kernels.convert: left heads.0 (mmdet.models.necks.pafpn.PAFPN) as it is: a "
            "subclass of mmdet.models.necks.fpn.FPN, which may have its own forward") in messages[0]
    assert messages[1] == ("fpn_kernels.convert: left heads.1 (mmdet.models.necks.fpn.FPN) as "
                           "it is: upsample_cfg mode 'bilinear' (only 'nearest' and "
                           "'nearest-exact' are fused)")
    assert messages[2].startswith("fpn_kernels.convert: converted heads.2 "
                                  "(mmdet.models.necks.fpn.FPN); running eager now: "
                                  "lateral_convs.0: GroupNorm is not a fixed per-channel")
    assert "lateral_convs.2: BatchNorm2d in training mode is not" in messages[3]

    x = make_inputs(ODD)
    model.eval()
    with torch.no_grad():
        model.neck(x)
        model.heads[3](x)
    assert fused_calls == ["eager"] * 6


def test_convert_with_report_records_everything_without_warning():
    model = Detector()
    model.neck = model.same_neck = FusedMMDetFPN.from_mmdet(model.neck)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, records = convert_with_report(model)
    assert got is model
    assert [(r.path, r.status, r.framework) for r in records] == [
        ("neck", "already-fused", "mmdet"),
        ("heads.0", "skipped", "mmdet"),
        ("heads.1", "skipped", "mmdet"),
        ("heads.2", "converted", "mmdet"),
        ("heads.3", "converted", "mmdet"),
    ]
    assert records[2].reason.startswith("upsample_cfg mode 'bilinear'")
    assert records[3].eager_merges == tuple(
        f"lateral_convs.{i}: GroupNorm is not a fixed per-channel affine map" for i in range(3)
    )
    assert records[4].eager_merges == tuple(
        f"lateral_convs.{i}: BatchNorm2d in training mode is not a fixed per-channel affine map"
        for i in range(3)
    )
    assert convert_with_report(nn.Linear(2, 2))[1] == []


def test_convert_of_a_bare_neck_returns_the_fused_one():
    neck = make_neck()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        fused = convert(neck)
    assert type(fused) is FusedMMDetFPN and type(neck) is FPN
    assert all(p is q for p, q in zip(fused.parameters(), neck.parameters(), strict=True))


# --------------------------------------------------------------------------- a whole detector


def test_retinanet_r50_from_its_config_matches_after_conversion(fused_calls):
    """mmdet's own RetinaNet R-50 FPN config, random weights (no download)."""
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    config = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", "retinanet",
                          "retinanet_r50_fpn_1x_coco.py")
    cfg = Config.fromfile(config).model
    cfg.backbone.init_cfg = None  # would download torchvision://resnet50
    torch.manual_seed(0)
    reference = MODELS.build(cfg).eval()
    randomize_(reference.neck)
    model = copy.deepcopy(reference)
    assert type(model.neck) is FPN
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert convert(model) is model
    assert type(model.neck) is FusedMMDetFPN

    images = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(images, mode="tensor")  # (cls_scores, bbox_preds) per level
        got = model(images, mode="tensor")
        feats_expected, feats_got = reference.extract_feat(images), model.extract_feat(images)
    assert len(fused_calls) == 2 * 2  # start_level=1: three laterals, two merges, per call
    for i, (g, e) in enumerate(zip(feats_got, feats_expected, strict=True)):
        assert_close(g, e, msg=f"neck output {i}")
    for name, gs, es in zip(("cls_scores", "bbox_preds"), got, expected, strict=True):
        for i, (g, e) in enumerate(zip(gs, es, strict=True)):
            assert_close(g, e, msg=f"{name}[{i}]")
    # The detector's other modules are its own; ...
    assert [n for n, _ in model.named_parameters()] == [
        n for n, _ in reference.named_parameters()
    ]
    # ... and the neck trains like mmdet's: a backward through the whole detector.
    for m in (reference, model):
        m.train()
        sum(t.sum() for outs in m(images, mode="tensor") for t in outs).backward()
    model_params = dict(model.neck.named_parameters())
    for name, p in reference.neck.named_parameters():
        assert_close(model_params[name].grad, p.grad, scale=100, msg=f"grad of neck.{name}")


def test_neck_bench_runs_every_framework(capsys):
    """``python -m fpn_kernels.frameworks.neck_bench`` at a tiny size: every row converts and
    agrees with its framework's neck."""
    import sys

    from fpn_kernels.frameworks import neck_bench

    before = set(sys.modules)
    try:
        assert neck_bench.main(["--image", "64x64", "--repeats", "1", "--stand-ins",
                                os.path.dirname(__file__)]) == 0
    finally:  # the stand-in detectron2 modules the bench registered
        for name in set(sys.modules) - before:
            if name.split(".")[0] == "detectron2":
                del sys.modules[name]
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms |" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        "| torchvision R50-FPN", "| mmdet Faster R-CNN FPN", "| mmdet RetinaNet FPN",
        "| detectron2 (tests' re-implementation) R50-FPN sum",
    ]
    for row in rows:
        assert float(row.split(" | ")[4].rstrip(" |")) < 1e-3, row
