"""convert() on detectron2's FPN, recognized by class path: against tests/_detectron2_fpn.py,
a re-implementation of detectron2's FPN semantics registered under detectron2's module paths
(detectron2 is not on PyPI)."""

from __future__ import annotations

import copy
import importlib.abc
import io
import sys
import warnings
from functools import partial

import _detectron2_fpn as d2
import pytest
import torch
import torch.nn.functional as F
from _neck_checks import assert_same_grad, assert_same_state, loss
from conftest import assert_close
from test_modules import cpu_backends, one_thread, randomize_  # noqa: F401  (one_thread: fixture)
from torch import nn

import fpn_kernels.frameworks.detectron2 as fw
from fpn_kernels import convert
from fpn_kernels.frameworks import ConversionWarning, convert_with_report
from fpn_kernels.frameworks.detectron2 import fused_class

OUT_CHANNELS = 8
IMAGE = (64, 96)  # divisible by 32: every level is exactly 2x the next


@pytest.fixture(autouse=True)
def detectron2_modules(monkeypatch):
    d2.install(monkeypatch)


@pytest.fixture
def fused_calls(monkeypatch):
    """(backend, weight, bias, top) of every fused op call the fused FPN makes."""
    calls = []
    real_op = fw.upsample_add_conv1x1

    def counting_op(lateral, weight, bias, top, **kwargs):
        calls.append(kwargs["backend"])
        return real_op(lateral, weight, bias, top, **kwargs)

    monkeypatch.setattr(fw, "upsample_add_conv1x1", counting_op)
    return calls


NORMS = {
    "none": "",
    "BN": "BN",
    "FrozenBN": "FrozenBN",
    "SyncBN": "SyncBN",
    "naiveSyncBN": "naiveSyncBN",
    "GN": partial(nn.GroupNorm, 2),  # detectron2's "GN" takes 32 groups: too many channels
}
TOP_BLOCKS = {
    "none": lambda: None,
    "maxpool": d2.LastLevelMaxPool,
    "p6p7_res5": lambda: d2.LastLevelP6P7(11, OUT_CHANNELS),
    "p6p7_p5": lambda: d2.LastLevelP6P7(OUT_CHANNELS, OUT_CHANNELS, in_feature="p5"),
}


def make_fpn(norm="none", top_block="maxpool", fuse_type="sum", training=False,
             in_features=("res2", "res3", "res4", "res5"), dtype=torch.float64):
    torch.manual_seed(0)
    fpn = d2.FPN(d2.TinyBottomUp(), list(in_features), OUT_CHANNELS, norm=NORMS[norm],
                 top_block=TOP_BLOCKS[top_block](), fuse_type=fuse_type)
    randomize_(fpn)  # non-trivial biases and norms (detectron2 zeroes biases)
    return fpn.to(dtype).train(training)


def image(hw=IMAGE, dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, *hw, generator=gen, dtype=dtype).requires_grad_(requires_grad)


def assert_same_forward_backward(reference, fused, hw=IMAGE, dtype=torch.float64):
    x_ref, x_fused = image(hw, dtype, True), image(hw, dtype, True)
    expected, got = reference(x_ref), fused(x_fused)
    assert type(got) is dict and list(got) == list(expected)
    for name in expected:
        assert_close(got[name], expected[name], msg=name)
    loss(expected.values()).backward()
    loss(got.values()).backward()
    assert_same_grad(x_fused, x_ref, 10, "grad of the image")
    assert_same_state(reference, fused, grad_scale=100)


def converted(fpn: nn.Module, backend: str = "auto") -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)  # tested below
        new = convert(copy.deepcopy(fpn), backend=backend)
    assert type(new) is fused_class(d2.FPN)
    return new


@pytest.mark.parametrize("fuse_type", ["sum", "avg"])
@pytest.mark.parametrize(("norm", "training", "fused"), [
    ("none", False, True),
    ("none", True, True),
    ("BN", False, True),
    ("BN", True, False),  # batch statistics
    ("FrozenBN", False, True),
    ("FrozenBN", True, True),
    ("SyncBN", False, True),
    ("naiveSyncBN", False, True),
    ("GN", False, False),
])
def test_matches_detectron2_norms(norm, training, fused, fuse_type, fused_calls):
    reference = make_fpn(norm, "p6p7_res5", fuse_type, training)
    assert_same_forward_backward(reference, converted(reference))
    assert fused_calls == (["auto"] * 3 if fused else [])


ALL_LEVELS = ("res2", "res3", "res4", "res5")
# The max pool and P6P7-from-P5 blocks read the "p5" output: only FPNs that make one.
TOP_BLOCK_CASES = [(ALL_LEVELS, name) for name in TOP_BLOCKS] + [
    (("res3", "res4"), "none"), (("res3", "res4"), "p6p7_res5"), (("res4",), "none"),
    (("res5",), "maxpool"),
]


@pytest.mark.parametrize("fuse_type", ["sum", "avg"])
@pytest.mark.parametrize(("in_features", "top_block"), TOP_BLOCK_CASES,
                         ids=[f"{'-'.join(f)}-{t}" for f, t in TOP_BLOCK_CASES])
def test_matches_detectron2_top_blocks(top_block, fuse_type, in_features, fused_calls):
    reference = make_fpn("FrozenBN", top_block, fuse_type, in_features=in_features)
    assert_same_forward_backward(reference, converted(reference))
    assert fused_calls == ["auto"] * (len(in_features) - 1)


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
@pytest.mark.parametrize("fuse_type", ["sum", "avg"])
def test_matches_detectron2_float32_every_backend(backend, fuse_type, fused_calls):
    reference = make_fpn("FrozenBN", "maxpool", fuse_type, dtype=torch.float32)
    assert_same_forward_backward(reference, converted(reference, backend), dtype=torch.float32)
    assert fused_calls == [backend] * 3


def test_avg_is_the_fused_sum_halved_exactly(fused_calls):
    """Halving W, b and top is exact: the avg merge is bit for bit the sum merge / 2."""
    sums, avgs = make_fpn("BN", fuse_type="sum"), make_fpn("BN", fuse_type="avg")
    fused_sum, fused_avg = converted(sums), converted(avgs)
    feature = torch.randn(2, 7, 16, 24, dtype=torch.float64)
    top = torch.randn(2, OUT_CHANNELS, 8, 12, dtype=torch.float64)
    lateral = fused_sum.lateral_convs[2]  # res3's
    assert torch.equal(fused_avg._merge(fused_avg.lateral_convs[2], feature, top),
                       fused_sum._merge(lateral, feature, top) / 2)
    assert len(fused_calls) == 2


def test_odd_image_sizes_fail_as_detectron2_does(fused_calls):
    """Sizes that are not 2x apart: detectron2's add fails; so does the fused FPN's, which
    leaves those merges on detectron2's expression."""
    reference = make_fpn()
    fused = converted(reference)
    with pytest.raises(RuntimeError) as expected:
        reference(image((70, 90)))
    with pytest.raises(RuntimeError) as got:
        fused(image((70, 90)))
    assert str(got.value) == str(expected.value)
    assert fused_calls == []  # res5 3x3 -> 6x6 misses res4's 5x6: the first merge fails


def test_height_one_broadcasts_as_in_detectron2(fused_calls):
    """res5 and res4 of height 1: 2x upsampling gives 2 rows, and detectron2's add broadcasts
    the lateral's one row over them. The fused FPN leaves that merge on its expression."""
    reference = make_fpn(in_features=("res4", "res5"))
    fused = converted(reference)
    assert_same_forward_backward(reference, fused, hw=(16, 64))
    assert reference(image((16, 64)))["p4"].shape[2:] == (2, 4)
    assert fused_calls == []


def test_activation_and_hooks_keep_detectron2s_expression(fused_calls):
    reference = make_fpn("BN")
    reference.fpn_lateral2.activation = F.relu
    fused = converted(reference)
    calls = []
    fused.fpn_lateral3.norm.register_forward_hook(lambda *args: calls.append("norm"))
    assert_same_forward_backward(reference, fused)
    assert calls == ["norm"]
    assert fused_calls == ["auto"]  # fpn_lateral4 only


def test_fold_follows_the_live_frozen_batchnorm(fused_calls):
    reference = make_fpn("FrozenBN")
    fused = convert(reference)  # shares every buffer
    norm = reference.fpn_lateral3.norm
    x = image()
    with torch.no_grad():
        norm.weight.mul_(-2.0)
        norm.running_var.mul_(3.0)
        expected, got = reference(x), fused(x)
    for name in expected:
        assert_close(got[name], expected[name], msg=name)
    # Buffers replaced by .to() (not updated in place) are seen too.
    reference.to(torch.float32)
    assert fused.fpn_lateral3.norm.running_var.dtype == torch.float32
    with torch.no_grad():
        expected, got = reference(x.float()), fused(x.float())
    for name in expected:
        assert_close(got[name], expected[name], msg=name)
    assert len(fused_calls) == 6


# --------------------------------------------------------------------------- the module


def test_fused_module_is_detectron2s_fpn():
    reference = make_fpn("BN")
    fused = fw.fused(reference, "eager")
    cls = type(fused)
    assert cls is fused_class(d2.FPN) and cls.__name__ == "FusedDetectron2FPN"
    assert isinstance(fused, d2.FPN) and isinstance(fused, d2.Backbone)
    assert fused.backend == "eager" and "backend='eager'" in repr(fused)
    assert fused.output_shape() == reference.output_shape()
    assert fused.size_divisibility == 32 and fused.padding_constraints == {"square_size": 0}
    assert all(p is q for p, q in zip(fused.parameters(), reference.parameters(), strict=True))
    assert list(fused.state_dict()) == list(reference.state_dict())
    back = fused.to_detectron2()
    assert type(back) is d2.FPN and not hasattr(back, "backend")
    assert back.lateral_convs == reference.lateral_convs
    assert all(p is q for p, q in zip(back.parameters(), reference.parameters(), strict=True))


@pytest.mark.parametrize("fuse_type", ["sum", "avg"])
def test_torch_compile_captures_one_graph(fuse_type, fused_calls):
    reference = make_fpn("FrozenBN", fuse_type=fuse_type, dtype=torch.float32)
    compiled = torch.compile(converted(reference), fullgraph=True, backend="eager")
    x = image(dtype=torch.float32)
    expected, got = reference(x), compiled(x)
    for name in expected:
        assert_close(got[name], expected[name], msg=name)
    assert len(fused_calls) == 3  # traced through the counting wrapper


def test_pickles_whole():
    reference = make_fpn("FrozenBN")
    fused = converted(reference)
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert type(loaded) is type(fused)
    x = image()
    expected, got = reference(x), loaded(x)
    for name in expected:
        assert_close(got[name], expected[name], msg=name)


class _NoDetectron2(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "detectron2":
            raise AssertionError(f"imported {name}")
        return None


def test_converts_without_importing_detectron2(monkeypatch, fused_calls):
    reference = make_fpn("FrozenBN")
    model = nn.ModuleDict({"backbone": copy.deepcopy(reference)})
    for name in [m for m in sys.modules if m.split(".")[0] == "detectron2"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_NoDetectron2(), *sys.meta_path])
    monkeypatch.setattr(fw, "_FUSED", {})  # the fused class is created here, too
    convert(model)
    x = image()
    expected, got = reference(x), model["backbone"](x)
    for name in expected:
        assert_close(got[name], expected[name], msg=name)
    assert len(fused_calls) == 3


def test_bad_arguments_name_themselves():
    class MyFPN(d2.FPN):
        pass

    with pytest.raises(TypeError, match="base: expected the class detectron2.modeling.backbone."
                                        "fpn.FPN, got test_detectron2.*MyFPN"):
        fused_class(MyFPN)
    with pytest.raises(TypeError, match="base: expected the class .*, got a FPN"):
        fused_class(make_fpn())
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got dict"):
        convert({"backbone": make_fpn()})
    with pytest.raises(TypeError, match="neck: expected a detectron2.modeling.backbone.fpn.FPN"):
        fused_class(d2.FPN)._retyped_from(nn.Conv2d(1, 1, 1), "auto")
    with pytest.raises(ValueError, match="backend"):
        fw.fused(make_fpn(), "nope")
    with pytest.raises(TypeError, match="backend"):
        convert(make_fpn(), backend=None)


# --------------------------------------------------------------------------- convert()


class MyFPN(d2.FPN):
    """A user's subclass: it may have its own forward, so convert() leaves it alone."""


def test_convert_swaps_reports_and_warns(fused_calls):
    model = nn.Module()
    model.backbone = make_fpn("BN")
    model.train_bn = make_fpn("BN", training=True)
    model.gn = make_fpn("GN")
    torch.manual_seed(0)
    model.custom = MyFPN(d2.TinyBottomUp(), ["res4", "res5"], OUT_CHANNELS)
    custom = model.custom
    with pytest.warns(ConversionWarning) as caught:
        assert convert(model) is model
    fused = fused_class(d2.FPN)
    assert type(model.backbone) is fused and type(model.train_bn) is fused
    assert type(model.gn) is fused and model.custom is custom
    messages = [str(w.message) for w in caught]
    assert all(w.filename == __file__ for w in caught)
    assert messages == [
        "fpn_kernels.convert: converted train_bn (detectron2.modeling.backbone.fpn.FPN); running "
        "eager now: fpn_lateral4: BatchNorm2d in training mode is not a fixed per-channel affine "
        "map; fpn_lateral3: BatchNorm2d in training mode is not a fixed per-channel affine map; "
        "fpn_lateral2: BatchNorm2d in training mode is not a fixed per-channel affine map",
        "fpn_kernels.convert: converted gn (detectron2.modeling.backbone.fpn.FPN); running eager "
        "now: fpn_lateral4: GroupNorm is not a fixed per-channel affine map; fpn_lateral3: "
        "GroupNorm is not a fixed per-channel affine map; fpn_lateral2: GroupNorm is not a fixed "
        "per-channel affine map",
        "fpn_kernels.convert: left custom (test_detectron2.MyFPN) as it is: a subclass of "
        "detectron2.modeling.backbone.fpn.FPN, which may have its own forward; only "
        "detectron2.modeling.backbone.fpn.FPN itself is converted",
    ]
    _, records = convert_with_report(model)
    assert [(r.path, r.status) for r in records] == [
        ("backbone", "already-fused"), ("train_bn", "already-fused"), ("gn", "already-fused"),
        ("custom", "skipped"),
    ]
    model.train_bn.eval()
    model.train_bn(image())
    assert len(fused_calls) == 3


def test_nested_fpns_are_all_converted(fused_calls):
    """An FPN inside another's bottom_up: the inner one is swapped before the outer is copied."""
    outer = make_fpn()
    inner = make_fpn("FrozenBN")
    outer.bottom_up.extra = inner
    new, records = convert_with_report(outer)
    assert type(new) is fused_class(d2.FPN) and type(new.bottom_up.extra) is type(new)
    assert [(r.path, r.status) for r in records] == [("", "converted"),
                                                     ("bottom_up.extra", "converted")]


def test_fpns_of_several_frameworks_in_one_model(fused_calls):
    from torchvision.ops import FeaturePyramidNetwork

    from fpn_kernels import FusedFPN

    model = nn.ModuleDict({
        "d2": make_fpn("BN"),
        "tv": FeaturePyramidNetwork([4, 6], 5, norm_layer=nn.BatchNorm2d),  # training mode
        "tv_custom": type("CustomFPN", (FeaturePyramidNetwork,), {})([4, 6], 5),
    })
    with pytest.warns(ConversionWarning) as caught:
        convert(model)
    assert type(model["d2"]) is fused_class(d2.FPN) and type(model["tv"]) is FusedFPN
    assert [str(w.message) for w in caught] == [
        "fpn_kernels.convert: converted tv (torchvision.ops.feature_pyramid_network."
        "FeaturePyramidNetwork); running eager now: inner_blocks.0: BatchNorm2d in training mode "
        "is not a fixed per-channel affine map",
        "fpn_kernels.convert: left tv_custom (test_detectron2.CustomFPN) as it is: a subclass of "
        "torchvision.ops.feature_pyramid_network.FeaturePyramidNetwork, which may have its own "
        "forward; only torchvision.ops.feature_pyramid_network.FeaturePyramidNetwork itself is "
        "converted",
    ]
    _, records = convert_with_report(model)
    assert [(r.path, r.framework, r.status) for r in records] == [
        ("d2", "detectron2", "already-fused"), ("tv", "torchvision", "already-fused"),
        ("tv_custom", "torchvision", "skipped"),
    ]
    assert str(records[0]) == "d2 (fpn_kernels.frameworks.detectron2.FusedDetectron2FPN) is " \
                              "already fused"
