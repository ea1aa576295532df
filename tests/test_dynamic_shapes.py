"""Symbolic sizes stay symbolic: torch.export with Dims and torch.compile(dynamic=True), grad on.

Before the fix, ``setup_context`` asked ``out_h + out_w <= 128`` (which ATen index kernel eager
runs) of the symbolic sizes, which specialized H and W to the example's values, so export with
``dynamic_shapes`` failed and ``torch.compile(dynamic=True)`` recompiled for every size.
"""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from fpn_kernels import upsample_add_conv1x1, upsample_add_conv1x1_reference
from tests.conftest import assert_close

# (N, H, W) of top; lateral is (2h, 2w) or, with scale_factor=None and `odd`, (2h - 1, 2w - 1).
EXAMPLE = (2, 10, 15)
# N >= 2: dynamo specializes size 0 and 1 by design (its 0/1 rule), not because of the op.
OTHER_SIZES = [(3, 7, 11), (4, 16, 9), (2, 40, 50)]  # 80 + 100 > 128: the other CPU kernel


class Merge(torch.nn.Module):
    def __init__(self, scale_factor=None, mode="nearest", c_in=5, c_out=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(c_out, c_in, 1, 1, generator=g) / 3)
        self.bias = torch.nn.Parameter(torch.randn(c_out, generator=g))
        self.scale_factor, self.mode = scale_factor, mode

    def forward(self, lateral, top):
        return upsample_add_conv1x1(lateral, self.weight, self.bias, top, mode=self.mode,
                                    scale_factor=self.scale_factor)

    def reference(self, lateral, top):
        sf = None if self.scale_factor is None else [self.scale_factor] * 2
        return upsample_add_conv1x1_reference(lateral, self.weight, self.bias, top, self.mode, sf)


def inputs(n, h, w, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    lateral = torch.randn(n, 5, 2 * h, 2 * w, generator=g)
    top = torch.randn(n, 6, h, w, generator=g)
    if channels_last:
        lateral = lateral.contiguous(memory_format=torch.channels_last)
        top = top.contiguous(memory_format=torch.channels_last)
    return lateral, top


def check_forward_backward(fn, model, lateral, top):
    """fn's output and all gradients against the eager reference."""
    lat, tp = (t.detach().clone().requires_grad_(True) for t in (lateral, top))
    out = fn(lat, tp)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    got = [lat.grad, tp.grad, model.weight.grad, model.bias.grad]
    model.zero_grad()
    lat2, tp2 = (t.detach().clone().requires_grad_(True) for t in (lateral, top))
    expected = model.reference(lat2, tp2)
    expected.backward(grad_out)
    want = [lat2.grad, tp2.grad, model.weight.grad, model.bias.grad]
    model.zero_grad()
    assert_close(out, expected, msg="output")
    for name, g, w in zip(("lateral", "top", "weight", "bias"), got, want, strict=True):
        assert_close(g, w, scale=10.0, msg=f"grad {name}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("scale_factor", [None, 2.0], ids=["size", "scale_factor"])
def test_export_with_dims_and_grad_enabled(scale_factor, channels_last):
    model = Merge(scale_factor)
    n, h, w = Dim("N", min=1, max=64), Dim("H", min=2, max=512), Dim("W", min=2, max=512)
    example = inputs(*EXAMPLE, channels_last=channels_last)
    assert torch.is_grad_enabled() and model.weight.requires_grad
    ep = torch.export.export(
        model, example, dynamic_shapes=({0: n, 2: 2 * h, 3: 2 * w}, {0: n, 2: h, 3: w})
    )
    # Every input size stayed a symbol: none was specialized to the example's value.
    placeholders = [node for node in ep.graph.nodes if node.op == "placeholder"][-2:]
    for node in placeholders:
        shape = node.meta["val"].shape
        assert all(isinstance(s, torch.SymInt) for s in (shape[0], shape[2], shape[3])), shape
    targets = [node.target for node in ep.graph.nodes if node.op == "call_function"]
    assert torch.ops.fpn_kernels.upsample_add_conv1x1.default in targets
    exported = ep.module()
    for i, size in enumerate(OTHER_SIZES):
        lateral, top = inputs(*size, channels_last=channels_last, seed=i + 1)
        assert_close(exported(lateral, top), model.reference(lateral, top), msg=str(size))


def test_export_odd_sizes_with_dims():
    """lateral 2h - 1 from top h (ceil-halved feature maps), symbolic all the way."""
    model = Merge()
    n, h, w = Dim("N", min=1, max=64), Dim("H", min=2, max=512), Dim("W", min=2, max=512)
    lat, top = inputs(*EXAMPLE)
    lat = lat[:, :, :-1, :-1].contiguous()
    ep = torch.export.export(
        model, (lat, top), dynamic_shapes=({0: n, 2: 2 * h - 1, 3: 2 * w - 1}, {0: n, 2: h, 3: w})
    )
    for i, size in enumerate([(1, 13, 19), (2, 7, 11), (1, 50, 76)]):
        lateral, top = inputs(*size, seed=i + 1)
        lateral = lateral[:, :, :-1, :-1].contiguous()
        assert_close(ep.module()(lateral, top), model.reference(lateral, top), msg=str(size))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_compile_dynamic_compiles_once_for_three_sizes(channels_last):
    """Forward and backward through aot_autograd with symbolic sizes: one compile, exact
    gradients at every size (the backward decides its index kernel on concrete sizes)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = Merge()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=True, fullgraph=True)
    for i, size in enumerate([(2, 10, 15), *OTHER_SIZES]):
        lateral, top = inputs(*size, channels_last=channels_last, seed=i)
        check_forward_backward(compiled, model, lateral, top)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times for 4 sizes"
    torch._dynamo.reset()


def test_aoti_package_with_dims_keeps_the_op_and_runs_at_other_sizes(tmp_path, monkeypatch):
    """AOTInductor compiles the exported program (the op stays one call: the ONNX
    decomposition in torch._decomp's table is not applied), loads, and runs at other sizes.
    With CI set and no cache, as in a fresh CI run: Inductor's implicit fallback refused the
    op there, because of that decomposition (ops._declare_inductor_fallbacks)."""
    monkeypatch.setenv("CI", "true")
    model = Merge()
    n, h, w = Dim("N", min=1, max=64), Dim("H", min=2, max=512), Dim("W", min=2, max=512)
    with torch.no_grad():
        ep = torch.export.export(model, inputs(*EXAMPLE),
                                 dynamic_shapes=({0: n, 2: 2 * h, 3: 2 * w}, {0: n, 2: h, 3: w}))
    with torch._inductor.config.patch(force_disable_caches=True):
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
        # also torch.compile's default backend, forward and backward
        lateral, top = (t.requires_grad_() for t in inputs(3, 7, 11))
        torch._dynamo.reset()
        torch.compile(model, fullgraph=True)(lateral, top).sum().backward()
        torch._dynamo.reset()
    with open(path, "rb") as f:
        assert b"fpn_kernels::upsample_add_conv1x1" in f.read()
    loaded = torch._inductor.aoti_load_package(path)
    for i, size in enumerate(OTHER_SIZES):
        lateral, top = inputs(*size, seed=i + 1)
        with torch.no_grad():
            assert_close(loaded(lateral, top), model.reference(lateral, top), msg=str(size))
