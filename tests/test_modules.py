"""FusedFPN and convert() against torchvision's FeaturePyramidNetwork with the same weights."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from collections import OrderedDict
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    LastLevelMaxPool,
    LastLevelP6P7,
)
from torchvision.ops.misc import FrozenBatchNorm2d

import fpn_kernels.modules as modules
from fpn_kernels.backends import BACKENDS, available_backends
from fpn_kernels.modules import FusedFPN, convert

CPU = torch.device("cpu")
IN_CHANNELS = [5, 7, 9, 11, 13]
OUT_CHANNELS = 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: with more threads, OpenMP's fork/join costs far more than the
    work (100x on a busy 2-core machine). The op's threaded paths are tested elsewhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cpu_backends(dtype: torch.dtype) -> list[str]:
    """"auto" plus every installed backend that runs ``dtype`` on CPU."""
    return ["auto"] + [
        name for name in available_backends()
        if not BACKENDS[name].not_supported_reasons(CPU, dtype)
    ]


class PoolFinestPlusContext(ExtraFPNBlock):
    """A user-defined extra block: reads both the results and the original features."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, results, x, names):
        context = self.proj(x[-1]).mean(dim=(2, 3), keepdim=True)
        results.append(F.max_pool2d(results[0], 3, stride=2, padding=1) + context)
        names.append("finest_pooled")
        return results, names


EXTRA_BLOCKS = {
    "none": lambda c_last: None,
    "maxpool": lambda c_last: LastLevelMaxPool(),
    "p6p7_from_p5": lambda c_last: LastLevelP6P7(OUT_CHANNELS, OUT_CHANNELS),
    "p6p7_from_c5": lambda c_last: LastLevelP6P7(c_last, OUT_CHANNELS),
    "custom": lambda c_last: PoolFinestPlusContext(c_last, OUT_CHANNELS),
}

NORMS = {
    "none": None,
    "batchnorm": nn.BatchNorm2d,
    "frozen_bn": FrozenBatchNorm2d,
    "groupnorm": partial(nn.GroupNorm, 2),
}


def halving_sizes(levels: int, hw=(37, 50)) -> list[tuple[int, int]]:
    """Odd sizes as a stride-2 backbone makes them: each level is ceil(previous / 2)."""
    sizes = [hw]
    for _ in range(levels - 1):
        sizes.append(tuple(math.ceil(s / 2) for s in sizes[-1]))
    return sizes


# Not 2x apart: the size-based interpolate both up- and down-samples (6x2 -> 5x4).
IRREGULAR_SIZES = [(23, 31), (9, 14), (5, 4), (6, 2), (3, 3)]


def make_features(sizes, dtype, channels_last, batch=2, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    features = OrderedDict()
    for i, hw in enumerate(sizes):
        t = torch.randn(batch, IN_CHANNELS[i], *hw, generator=gen, dtype=dtype)
        features[f"c{i + 2}"] = t.contiguous(memory_format=fmt).requires_grad_(requires_grad)
    return features


@torch.no_grad()
def randomize_(module: nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (torchvision zeroes conv biases; a fresh BatchNorm is the
    identity), so that a wrong fold or a dropped bias shows."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        if not t.is_floating_point():
            continue
        rand = torch.rand(t.shape, generator=gen, dtype=t.dtype)
        if name.endswith("running_var"):
            t.copy_(0.5 + 1.5 * rand)
        elif t.dim() == 1 and name.endswith("weight"):  # norm scales
            t.copy_(0.5 + rand)
        elif t.dim() == 1:  # biases, norm shifts, running means
            t.copy_(rand - 0.5)


def make_pair(levels, extra, norm, backend, dtype=torch.float64, training=False,
              channels_last=False):
    """A torchvision FPN and a FusedFPN built independently and given the same weights."""
    c_last = IN_CHANNELS[levels - 1]
    torch.manual_seed(0)
    reference = FeaturePyramidNetwork(
        IN_CHANNELS[:levels], OUT_CHANNELS, EXTRA_BLOCKS[extra](c_last), NORMS[norm]
    )
    fused = FusedFPN(
        IN_CHANNELS[:levels], OUT_CHANNELS, EXTRA_BLOCKS[extra](c_last), NORMS[norm],
        backend=backend,
    )
    randomize_(reference)
    fused.load_state_dict(reference.state_dict(), strict=True)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for m in (reference, fused):
        m.to(dtype=dtype, memory_format=fmt).train(training)
    return reference, fused


def atol_for(dtype: torch.dtype, expected) -> float:
    scale = max(t.abs().max().item() for t in expected.values())
    return {torch.float64: 1e-10, torch.float32: 1e-5}[dtype] * max(scale, 1.0)


def assert_same_outputs(expected, got, atol):
    assert isinstance(got, OrderedDict)
    assert list(got) == list(expected)
    for name in expected:
        e, g = expected[name], got[name]
        assert g.shape == e.shape and g.dtype == e.dtype, name
        assert g.is_contiguous(memory_format=torch.channels_last) == e.is_contiguous(
            memory_format=torch.channels_last
        ), f"{name}: memory format differs from torchvision's"
        torch.testing.assert_close(g, e, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def assert_same_state(expected: nn.Module, got: nn.Module, atol: float):
    exp, res = expected.state_dict(), got.state_dict()
    assert list(res) == list(exp)
    for k in exp:
        torch.testing.assert_close(res[k], exp[k], atol=atol, rtol=0,
                                   msg=lambda m, k=k: f"{k}: {m}")


# --------------------------------------------------------------------------- forward vs torchvision


@pytest.mark.parametrize("backend", cpu_backends(torch.float64))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("extra", list(EXTRA_BLOCKS))
@pytest.mark.parametrize("sizes", ["halving", "irregular"])
@pytest.mark.parametrize("levels", [2, 3, 4, 5])
def test_matches_torchvision_levels_and_extra_blocks(levels, sizes, extra, channels_last, backend):
    reference, fused = make_pair(levels, extra, "none", backend, channels_last=channels_last)
    hw = halving_sizes(levels) if sizes == "halving" else IRREGULAR_SIZES[:levels]
    x = make_features(hw, torch.float64, channels_last)
    expected = reference(x)
    assert_same_outputs(expected, fused(x), atol_for(torch.float64, expected))


@pytest.mark.parametrize("backend", cpu_backends(torch.float64))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_matches_torchvision_norm_layers(norm, training, channels_last, backend):
    reference, fused = make_pair(
        4, "p6p7_from_c5", norm, backend, training=training, channels_last=channels_last
    )
    x = make_features(halving_sizes(4), torch.float64, channels_last)
    expected = reference(x)
    assert_same_outputs(expected, fused(x), atol_for(torch.float64, expected))
    # In training mode BatchNorm's running statistics move identically.
    assert_same_state(reference, fused, atol=1e-12)


@pytest.mark.parametrize("backend", cpu_backends(torch.float32))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("norm", ["none", "batchnorm", "frozen_bn"])
def test_matches_torchvision_float32(norm, channels_last, backend):
    reference, fused = make_pair(3, "maxpool", norm, backend, torch.float32,
                                 channels_last=channels_last)
    x = make_features(halving_sizes(3, (45, 61)), torch.float32, channels_last)
    expected = reference(x)
    assert_same_outputs(expected, fused(x), atol_for(torch.float32, expected))


@pytest.mark.parametrize(
    ("norm", "training", "fused_merges"),
    [
        ("none", False, True),
        ("none", True, True),
        ("frozen_bn", True, True),
        ("batchnorm", False, True),  # running statistics: folded into the 1x1
        ("batchnorm", True, False),  # batch statistics: exact eager path
        ("groupnorm", False, False),  # not a per-channel affine map
    ],
)
def test_which_merges_run_the_fused_op(monkeypatch, norm, training, fused_merges):
    calls = []
    real_op = modules.upsample_add_conv1x1

    def counting_op(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real_op(*args, **kwargs)

    monkeypatch.setattr(modules, "upsample_add_conv1x1", counting_op)
    _, fused = make_pair(4, "maxpool", norm, "eager", training=training)
    fused(make_features(halving_sizes(4), torch.float64, False))
    assert calls == (["eager"] * 3 if fused_merges else [])


def test_empty_batch():
    reference, fused = make_pair(3, "maxpool", "none", "auto")
    x = make_features(halving_sizes(3), torch.float64, False, batch=0)
    assert_same_outputs(reference(x), fused(x), atol=0)


# --------------------------------------------------------------------------- norm folding


def test_folded_norm_follows_parameter_changes():
    """The fold is recomputed from the live parameters: in-place edits, a loaded state_dict and
    running statistics updated in training mode all show in the next eval forward."""
    reference, _ = make_pair(3, "none", "batchnorm", "auto")
    fused = FusedFPN.from_torchvision(reference)  # shares every parameter and buffer
    x = make_features(halving_sizes(3), torch.float64, False)
    atol = atol_for(torch.float64, reference(x))

    assert_same_outputs(reference(x), fused(x), atol)
    conv, bn = fused.inner_blocks[0]
    with torch.no_grad():
        bn.weight.mul_(-2.0)
        bn.bias.add_(1.0)
        bn.running_mean.add_(0.25)
        bn.running_var.mul_(3.0)
        conv.weight.mul_(0.5)
    assert_same_outputs(reference(x), fused(x), atol)

    state = reference.state_dict()
    randomize_(reference, seed=1)
    reference.load_state_dict(state)
    assert_same_outputs(reference(x), fused(x), atol)

    fused.train()
    fused(x)  # moves the shared running statistics
    fused.eval()
    reference.eval()
    assert_same_outputs(reference(x), fused(x), atol)


def test_fold_keeps_the_conv_dtype_when_the_norm_is_float32():
    conv = nn.Conv2d(4, 3, 1, bias=False).double()
    block = nn.Sequential(conv, nn.BatchNorm2d(3).eval())
    randomize_(block)
    weight, bias = modules.fused_lateral(block)
    assert weight.dtype == bias.dtype == torch.float64
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    expected = block[1](conv(x).float()).double()
    torch.testing.assert_close(F.conv2d(x, weight, bias), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("backend", cpu_backends(torch.float64))
@pytest.mark.parametrize("input_grads", [True, False], ids=["input_grads", "frozen_inputs"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("norm", list(NORMS))
def test_training_step_gradients_match(norm, training, input_grads, backend):
    reference, fused = make_pair(4, "p6p7_from_p5", norm, backend, training=training)
    sizes = halving_sizes(4, (29, 42))
    x_ref = make_features(sizes, torch.float64, False, requires_grad=input_grads)
    x_fused = make_features(sizes, torch.float64, False, requires_grad=input_grads)

    def loss(outputs):
        gen = torch.Generator().manual_seed(1)
        return sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum()
                   for t in outputs.values())

    loss(reference(x_ref)).backward()
    loss(fused(x_fused)).backward()
    ref_params, fused_params = dict(reference.named_parameters()), dict(fused.named_parameters())
    assert list(fused_params) == list(ref_params)
    for name, p in ref_params.items():
        assert p.grad is not None, name
        torch.testing.assert_close(fused_params[name].grad, p.grad, atol=1e-9, rtol=1e-10,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")
    if input_grads:
        for name in x_ref:
            torch.testing.assert_close(x_fused[name].grad, x_ref[name].grad, atol=1e-9,
                                       rtol=1e-10, msg=lambda m, n=name: f"grad of {n}: {m}")


# --------------------------------------------------------------------------- state_dict


@pytest.mark.parametrize("norm", list(NORMS))
def test_state_dict_loads_strictly_both_ways(norm):
    reference, fused = make_pair(3, "p6p7_from_c5", norm, "auto")
    assert list(fused.state_dict()) == list(reference.state_dict())
    fresh_reference, _ = make_pair(3, "p6p7_from_c5", norm, "auto")
    randomize_(fresh_reference, seed=2)
    fresh_reference.load_state_dict(fused.state_dict(), strict=True)
    assert_same_state(reference, fresh_reference, atol=0)
    assert fused.state_dict()._metadata[""]["version"] == FeaturePyramidNetwork._version


def test_loads_a_version_1_state_dict():
    """torchvision renames old ``inner_blocks.0.weight`` keys; FusedFPN inherits that."""
    reference, fused = make_pair(3, "none", "none", "auto")
    randomize_(fused, seed=3)
    old = OrderedDict(
        (k.replace(".0.weight", ".weight").replace(".0.bias", ".bias"), v)
        for k, v in reference.state_dict().items()
    )
    old._metadata = {"": {"version": 1}}
    assert "inner_blocks.0.weight" in old
    fused.load_state_dict(old, strict=True)
    assert_same_state(reference, fused, atol=0)


# --------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_from_and_to_torchvision_share_everything(training):
    reference, _ = make_pair(3, "p6p7_from_c5", "batchnorm", "auto", training=training)
    hook_calls = []
    reference.register_forward_hook(lambda *args: hook_calls.append(1))
    fused = FusedFPN.from_torchvision(reference, backend="eager")
    assert type(reference) is FeaturePyramidNetwork  # the original is left as it is
    assert type(fused) is FusedFPN and fused.backend == "eager"
    assert fused.training == training
    for (name, p), (fused_name, q) in zip(reference.named_parameters(),
                                          fused.named_parameters(), strict=True):
        assert name == fused_name and p is q
    back = fused.to_torchvision()
    assert type(back) is FeaturePyramidNetwork and not hasattr(back, "backend")
    assert all(p is q for p, q in zip(back.parameters(), reference.parameters(), strict=True))
    assert back.training == training

    x = make_features(halving_sizes(3), torch.float64, False)
    reference.eval()  # and so the shared submodules
    fused.eval()
    expected = reference(x)
    assert_same_outputs(expected, fused(x), atol_for(torch.float64, expected))
    assert_same_outputs(expected, back(x), atol=0)
    assert len(hook_calls) == 3


def test_from_torchvision_rejects_subclasses_and_bad_backends():
    class CustomFPN(FeaturePyramidNetwork):
        pass

    with pytest.raises(TypeError, match="CustomFPN"):
        FusedFPN.from_torchvision(CustomFPN([4], 4))
    with pytest.raises(ValueError, match="backend"):
        FusedFPN([4], 4, backend="nope")
    with pytest.raises(TypeError, match="backend"):
        FusedFPN([4], 4, backend=None)
    with pytest.raises(ValueError, match="backend"):
        convert(nn.Sequential(), backend="nope")


class TwoNecks(nn.Module):
    """A model with FPNs at several depths, one of them reachable under two names."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.neck = FeaturePyramidNetwork(IN_CHANNELS[:3], OUT_CHANNELS, LastLevelMaxPool())
        self.heads = nn.ModuleDict({
            "deep": nn.Sequential(
                nn.Identity(), FeaturePyramidNetwork(IN_CHANNELS[:2], OUT_CHANNELS)
            ),
        })
        self.same_neck = self.neck
        self.custom = type("CustomFPN", (FeaturePyramidNetwork,), {})(IN_CHANNELS[:2], 4)
        randomize_(self)

    def forward(self, x):
        two_levels = OrderedDict(list(x.items())[:2])
        return [self.neck(x), self.heads["deep"][1](two_levels), self.same_neck(x)]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_convert_swaps_every_torchvision_fpn_in_place(training):
    model = TwoNecks().double().train(training)
    params = [id(p) for p in model.parameters()]
    x = make_features(halving_sizes(3), torch.float64, False)
    expected = model(x)

    from fpn_kernels.frameworks import ConversionWarning

    with pytest.warns(ConversionWarning, match=r"left custom \(.*CustomFPN\) as it is: a subclass"):
        assert convert(model, backend="eager") is model
    assert type(model.neck) is FusedFPN and model.neck.backend == "eager"
    assert type(model.heads["deep"][1]) is FusedFPN
    assert model.same_neck is model.neck
    assert type(model.custom).__name__ == "CustomFPN"  # a subclass keeps its own forward
    assert [id(p) for p in model.parameters()] == params
    assert all(m.training == training for m in model.modules())
    assert all(p.dtype == torch.float64 for p in model.parameters())
    for e, g in zip(expected, model(x), strict=True):
        assert_same_outputs(e, g, atol_for(torch.float64, e))


def test_convert_of_a_bare_fpn_returns_the_fused_module():
    reference, _ = make_pair(2, "none", "none", "auto")
    fused = convert(reference)
    assert type(fused) is FusedFPN and type(reference) is FeaturePyramidNetwork
    assert all(p is q for p, q in zip(fused.parameters(), reference.parameters(), strict=True))


# --------------------------------------------------------------------------- compile and export


def test_torch_compile_fullgraph_matches():
    reference, fused = make_pair(3, "maxpool", "batchnorm", "auto", torch.float32)
    x = make_features(halving_sizes(3, (33, 41)), torch.float32, False)
    expected = reference(x)
    compiled = torch.compile(fused, fullgraph=True)
    assert_same_outputs(expected, compiled(x), atol_for(torch.float32, expected))


def test_torch_compile_fullgraph_backward_matches():
    reference, fused = make_pair(3, "p6p7_from_p5", "none", "auto", torch.float64, training=True)
    x = make_features(halving_sizes(3, (21, 26)), torch.float64, False, requires_grad=True)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    sum(t.sum() for t in reference(x).values()).backward()
    expected = {n: p.grad.clone() for n, p in reference.named_parameters()}
    sum(t.sum() for t in compiled(x).values()).backward()
    for name, p in fused.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-9, rtol=1e-10)


def test_torch_export_matches_and_keeps_the_fused_op():
    reference, fused = make_pair(4, "p6p7_from_c5", "frozen_bn", "auto", torch.float32)
    x = make_features(halving_sizes(4), torch.float32, False)
    exported = torch.export.export(fused, (x,))
    fused_nodes = [
        n for n in exported.graph.nodes
        if n.op == "call_function" and "fpn_kernels.upsample_add_conv1x1" in str(n.target)
    ]
    assert len(fused_nodes) == 3
    expected = reference(x)
    assert_same_outputs(expected, exported.module()(x), atol_for(torch.float32, expected))


def test_torch_compile_fullgraph_as_the_first_call():
    """A fresh process that compiles before any eager call: backend selection and the
    missing-extension notice must not break the graph."""
    script = textwrap.dedent("""
        from collections import OrderedDict
        import torch
        from fpn_kernels.modules import FusedFPN
        fpn = FusedFPN([4, 8], 6).eval()
        x = OrderedDict(a=torch.randn(1, 4, 9, 11), b=torch.randn(1, 8, 5, 6))
        compiled = torch.compile(fpn, fullgraph=True, backend="aot_eager")
        out, expected = compiled(x), fpn(x)
        assert all(torch.allclose(out[k], expected[k], atol=1e-5) for k in out)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# --------------------------------------------------------------------------- neck bench


def test_neck_bench_cases_agree_at_a_small_size():
    from fpn_kernels.cli.neck_bench import feature_sizes, max_abs_error, neck_cases

    assert feature_sizes() == [(200, 304), (100, 152), (50, 76), (25, 38)]
    cases = neck_cases(1, torch.float32, True, "cpu", image_hw=(64, 96))
    assert set(cases) == {"torchvision", "fused", "torchvision+compile", "fused+compile"}
    expected, got = cases["torchvision"](), cases["fused"]()
    assert list(got) == ["0", "1", "2", "3", "pool"]
    assert_same_outputs(expected, got, atol_for(torch.float32, expected))
    assert 0 < max_abs_error(cases) <= atol_for(torch.float32, expected)
