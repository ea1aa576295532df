"""The op contract, every CPU backend against eager PyTorch (the spec)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fpn_kernels
from fpn_kernels.reference import upsample_add_conv1x1_reference as reference
from tests.conftest import TOLERANCES, make_inputs

# (N, C_in, C_out, (H, W), (h, w)): odd and non-2x sizes, top larger than lateral, 1 pixel.
SHAPES = [
    (2, 17, 33, (10, 19), (5, 10)),
    (1, 3, 17, (38, 75), (19, 38)),
    (3, 33, 3, (7, 7), (7, 7)),
    (1, 5, 8, (1, 5), (1, 1)),
    (2, 8, 6, (4, 4), (9, 9)),
    (1, 4, 5, (13, 1), (6, 1)),
    (2, 16, 16, (64, 66), (32, 33)),  # out_h + out_w > 128: ATen's generic upsample kernel
    (1, 3, 4, (3, 1100), (2, 550)),  # rows longer than a CPU tile: tiles are row segments
]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _compare(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    scale = max(1.0, expected.abs().max().item())  # sums of many terms: atol relative to size
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol, msg=what)


def _run(backend, n, c_in, c_out, out_hw, top_hw, dtype, channels_last, bias=True,
         mode="nearest", scale_factor=None, grads=True):
    inputs = make_inputs(n, c_in, c_out, out_hw, top_hw, dtype=dtype,
                         channels_last=channels_last, bias=bias, requires_grad=grads)
    lateral, weight, b, top = inputs
    out = fpn_kernels.upsample_add_conv1x1(lateral, weight, b, top, mode=mode,
                                           scale_factor=scale_factor, backend=backend)
    expected = reference(lateral, weight, b, top, mode, scale_factor)
    assert out.shape == expected.shape and out.dtype == dtype
    fmt = torch.channels_last if channels_last and out.shape[1] > 1 else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), "output memory format must follow lateral"
    _compare(out, expected, dtype, "forward")
    if grads:
        wrt = [t for t in inputs if t is not None]
        grad_out = torch.randn_like(expected)
        got = torch.autograd.grad(out, wrt, grad_out)
        want = torch.autograd.grad(expected, wrt, grad_out)
        for name, g, w in zip(["lateral", "weight", "bias", "top"][: len(wrt)] if bias else
                              ["lateral", "weight", "top"], got, want, strict=True):
            _compare(g, w, dtype, f"grad_{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[3]}<-{s[4]}x{s[1]}->{s[2]}")
def test_forward_and_gradients_match_eager(cpu_backend, shape, channels_last, dtype):
    if dtype not in fpn_kernels.backends.BACKENDS[cpu_backend].dtypes:
        pytest.skip(f"{cpu_backend} does not support {dtype}")
    _run(cpu_backend, *shape, dtype, channels_last)


@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_modes_and_bias(cpu_backend, mode, bias, channels_last):
    _run(cpu_backend, 2, 5, 7, (10, 19), (4, 7), torch.float32, channels_last, bias, mode)
    _run(cpu_backend, 1, 5, 7, (75, 100), (38, 50), torch.float64, channels_last, bias, mode)


@pytest.mark.parametrize("scale_factor,top_hw,out_hw", [
    (2.0, (5, 10), (10, 20)), ((2.0, 3.0), (4, 3), (8, 9)), (2.05, (10, 10), (20, 20)),
    (1.5, (7, 9), (10, 13)),
])
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_scale_factor(cpu_backend, scale_factor, top_hw, out_hw, mode):
    for channels_last in (False, True):
        _run(cpu_backend, 2, 6, 5, out_hw, top_hw, torch.float32, channels_last,
             mode=mode, scale_factor=scale_factor)


def test_non_contiguous_inputs(cpu_backend):
    g = torch.Generator().manual_seed(1)
    lateral = torch.randn(2, 10, 12, 9, generator=g)[:, ::2].transpose(2, 3)  # (2, 5, 9, 12)
    weight = torch.randn(6, 5, generator=g).t().contiguous().t()  # transposed storage
    bias = torch.randn(12, generator=g)[::2]
    top = torch.randn(2, 6, 10, 5, generator=g).transpose(2, 3)[..., :7]  # (2, 6, 5, 7)
    assert not lateral.is_contiguous() and not top.is_contiguous() and not bias.is_contiguous()
    out = fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top, backend=cpu_backend)
    _compare(out, reference(lateral, weight, bias, top), torch.float32, "forward")


def test_mixed_layouts_follow_lateral(cpu_backend):
    lateral, weight, bias, top = make_inputs(2, 6, 8, (12, 14), (6, 7))
    lateral_cl = lateral.contiguous(memory_format=torch.channels_last)
    out = fpn_kernels.upsample_add_conv1x1(lateral_cl, weight, bias, top, backend=cpu_backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    _compare(out, reference(lateral, weight, bias, top), torch.float32, "forward")
    top_cl = top.contiguous(memory_format=torch.channels_last)
    out = fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top_cl, backend=cpu_backend)
    assert out.is_contiguous()
    _compare(out, reference(lateral, weight, bias, top), torch.float32, "forward")


def test_weight_2d_and_4d_are_the_same(cpu_backend):
    lateral, weight, bias, top = make_inputs()
    a = fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top, backend=cpu_backend)
    b = fpn_kernels.upsample_add_conv1x1(lateral, weight.flatten(1), bias, top,
                                         backend=cpu_backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
def test_gradcheck_float64(cpu_backend, channels_last, mode):
    inputs = make_inputs(2, 3, 4, (5, 7), (3, 4), dtype=torch.float64,
                         channels_last=channels_last, requires_grad=True)

    def f(lateral, weight, bias, top):
        return fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top, mode=mode,
                                                backend=cpu_backend)

    assert torch.autograd.gradcheck(f, inputs)


def test_opcheck(cpu_backend):
    op = torch.ops.fpn_kernels.upsample_add_conv1x1.default
    for kwargs in ({}, {"mode": "nearest-exact"}, {"scale_factor": [2.0, 2.0]}):
        for channels_last in (False, True):
            lateral, weight, bias, top = make_inputs(2, 3, 4, (6, 8), (3, 4),
                                                     channels_last=channels_last,
                                                     requires_grad=True)
            torch.library.opcheck(op, (lateral, weight, bias, top),
                                  {**kwargs, "backend": cpu_backend})
    lateral, weight, _, top = make_inputs(1, 3, 4, (5, 5), (3, 3), bias=False,
                                          requires_grad=True)
    torch.library.opcheck(op, (lateral, weight, None, top), {"backend": cpu_backend})


def test_torch_compile_fullgraph_is_one_node(cpu_backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("inductor")

    def f(lateral, weight, bias, top):
        return fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top, backend=cpu_backend)

    compiled = torch.compile(f, fullgraph=True, backend=counter)
    inputs = make_inputs(2, 5, 7, (10, 19), (5, 10), requires_grad=True)
    out = compiled(*inputs)
    _compare(out, reference(*inputs), torch.float32, "compiled forward")
    out.sum().backward()
    assert counter.frame_count == 1
    graph = counter.graphs[0]
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.fpn_kernels.upsample_add_conv1x1.default in targets or any(
        "upsample_add_conv1x1" in str(t) for t in targets
    ), targets


def test_torch_export(cpu_backend):
    class Merge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lateral = torch.nn.Conv2d(5, 7, 1)

        def forward(self, lateral, top):
            return fpn_kernels.upsample_add_conv1x1(lateral, self.lateral.weight,
                                                    self.lateral.bias, top, backend=cpu_backend)

    module = Merge()
    lateral, _, _, top = make_inputs(2, 5, 7, (10, 19), (5, 10))
    exported = torch.export.export(module, (lateral, top))
    calls = [n for n in exported.graph.nodes if "upsample_add_conv1x1" in str(n.target)]
    assert len(calls) == 1
    expected = reference(lateral, module.lateral.weight, module.lateral.bias, top)
    _compare(exported.module()(lateral, top), expected.detach(), torch.float32, "export")


@pytest.mark.skipif("cpu" not in fpn_kernels.available_backends(), reason="C++ extension absent")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_forward_allocates_only_the_output(channels_last):
    """The fused CPU forward allocates the output and nothing of its size besides."""
    lateral, weight, bias, top = make_inputs(2, 64, 64, (64, 96), (32, 48),
                                             channels_last=channels_last)
    out_bytes = 2 * 64 * 64 * 96 * 4
    with torch.no_grad():
        fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top, backend="cpu")  # warm up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:
            fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top, backend="cpu")
    allocations = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0]
    big = [a for a in allocations if a >= out_bytes // 4]
    assert big == [out_bytes], f"allocations of >= 1/4 output size: {big}"
    assert sum(allocations) < out_bytes + out_bytes // 4, allocations


def test_auto_picks_the_fused_cpu_kernel_when_built():
    lateral, weight, bias, top = make_inputs()
    chosen = fpn_kernels.backends.select_backend("auto", lateral.device, lateral.dtype)
    expected = "cpu" if "cpu" in fpn_kernels.available_backends() else "eager"
    assert chosen == expected


def test_unavailable_backend_says_why():
    lateral, weight, bias, top = make_inputs()
    with pytest.raises(fpn_kernels.BackendUnavailableError, match=r"backend 'cuda' cannot run"):
        fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top, backend="cuda")
    with pytest.raises(ValueError, match=r"backend: expected 'auto' or one of"):
        fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top, backend="fast")


def test_package_works_without_the_extension():
    """Without the compiled libraries the package imports, says once why, and falls back to
    the eager reference (simulated by hiding fpn_kernels._C* from the import system)."""
    script = textwrap.dedent("""
        import sys, warnings

        class HideExtensions:
            def find_spec(self, name, path=None, target=None):
                if name.startswith("fpn_kernels._C"):
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, HideExtensions())
        warnings.simplefilter("always")
        with warnings.catch_warnings(record=True) as caught:
            import torch, fpn_kernels
            x = torch.randn(1, 3, 4, 4); w = torch.randn(2, 3, 1, 1); t = torch.randn(1, 2, 2, 2)
            out = fpn_kernels.upsample_add_conv1x1(x, w, None, t)
            out = fpn_kernels.upsample_add_conv1x1(x, w, None, t)
        ref = fpn_kernels.upsample_add_conv1x1_reference(x, w, None, t)
        assert torch.equal(out, ref)
        messages = [str(c.message) for c in caught if "fpn_kernels" in str(c.message)]
        assert len(messages) == 1, messages
        assert "cpu" not in fpn_kernels.available_backends()
        assert "eager" in fpn_kernels.available_backends()
        try:
            fpn_kernels.cpu_output_cache_info()
            raise AssertionError("the cache's API worked without the extension")
        except fpn_kernels.BackendUnavailableError as exc:
            assert "backend 'cpu' is unavailable" in str(exc), exc
        print(messages[0])
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "not built" in result.stdout and "eager" in result.stdout


def test_available_backends_are_ordered_and_explained():
    names = fpn_kernels.available_backends()
    order = list(fpn_kernels.backends.BACKENDS)
    assert names == [n for n in order if n in names] and "eager" in names
    report = fpn_kernels.backend_report()
    for name in order:
        assert name in report


def test_index_kernel_follows_the_callers_top_layout(cpu_backend):
    """A channels_last top with > 3 channels takes ATen's vectorized upsample kernel even when
    lateral is NCHW; where the two kernels' indices differ, we must follow the caller's top."""
    lateral = torch.zeros(1, 1, 4, 20, dtype=torch.float64)
    weight = torch.zeros(5, 1, 1, 1, dtype=torch.float64)
    top = torch.arange(50, dtype=torch.float64).reshape(1, 1, 5, 10).expand(1, 5, 5, 10)
    for fmt in (torch.contiguous_format, torch.channels_last):
        t = top.contiguous(memory_format=fmt)
        out = fpn_kernels.upsample_add_conv1x1(lateral, weight, None, t, scale_factor=(0.8, 2.05),
                                               backend=cpu_backend)
        assert torch.equal(out, F.interpolate(t, scale_factor=(0.8, 2.05)))
