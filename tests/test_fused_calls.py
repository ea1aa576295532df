"""The direct kernel calls of tests/fused_calls.py, run on CPU: the GPU tests call the CUDA
kernels through the same two functions, so a schema change breaks these tests first."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import assert_close, make_inputs
from fused_calls import fused_backward, fused_forward

from fpn_kernels import _cpp
from fpn_kernels.reference import (
    upsample_add_conv1x1_reference,
    upsample_add_conv1x1_reference_backward,
)


@pytest.fixture(autouse=True)
def cpu_library():
    reason = _cpp.load("_C")
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("mode,scale_factor", [("nearest", None), ("nearest-exact", None),
                                               ("nearest", (2.05, 1.5))])
def test_calls_match_the_reference(mode, scale_factor, channels_last):
    out_hw, top_hw = ((20, 15), (10, 10)) if scale_factor else ((19, 75), (10, 38))
    lateral, weight, bias, top = make_inputs(2, 6, 5, out_hw, top_hw, channels_last=channels_last)
    w2d = weight[:, :, 0, 0].contiguous()
    out = fused_forward(lateral, w2d, bias, top, mode, scale_factor, channels_last)
    assert_close(out, upsample_add_conv1x1_reference(lateral, weight, bias, top, mode,
                                                     scale_factor))
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    grad_out = grad_out.contiguous(memory_format=torch.channels_last if channels_last
                                   else torch.contiguous_format)
    grads = fused_backward(grad_out, lateral, w2d, top_hw, mode, scale_factor, channels_last)
    vectorized = channels_last or sum(out_hw) <= 128  # ATen's CPU kernel choice, as the helper
    want = upsample_add_conv1x1_reference_backward(grad_out, lateral, w2d, top_hw, mode,
                                                   scale_factor, vectorized_upsample=vectorized)
    pixels = out_hw[0] * out_hw[1]
    for name, got, expected, terms in zip(("lateral", "weight", "bias", "top"), grads, want,
                                          (5, 2 * pixels, 2 * pixels, 8), strict=True):
        assert_close(got, expected.reshape(got.shape), scale=math.sqrt(terms), msg=name)
    only_top = fused_backward(grad_out, lateral, w2d, top_hw, mode, scale_factor,
                              channels_last, needs=[False, False, False, True])
    assert [g.numel() > 0 for g in only_top] == [False, False, False, True]
    assert torch.equal(only_top[3], grads[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("c_in,c_out", [(0, 8), (8, 0), (0, 0)])
def test_backward_of_zero_channels_is_empty_or_the_sums_of_grad_out(c_in, c_out, channels_last,
                                                                  dtype):
    """The op's Python entry rejects C_in = 0 and C_out = 0, but the kernel itself must not
    crash on them (a division by the number of grad_weight column blocks once did): empty
    gradients where a size is 0, grad_bias and grad_top the sums of grad_out."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(2)
    lateral = torch.randn(2, c_in, 6, 8, generator=g).to(dtype).contiguous(memory_format=fmt)
    grad_out = torch.randn(2, c_out, 6, 8, generator=g).to(dtype).contiguous(memory_format=fmt)
    w2d = torch.randn(c_out, c_in, generator=g).to(dtype)
    grads = fused_backward(grad_out, lateral, w2d, (3, 4), channels_last=channels_last)
    assert [tuple(t.shape) for t in grads] == [(2, c_in, 6, 8), (c_out, c_in), (c_out,),
                                               (2, c_out, 3, 4)]
    # (6, 8) from (3, 4) is an exact 2x nearest upsample: grad_top sums 2 x 2 windows.
    windows = grad_out.float().reshape(2, c_out, 3, 2, 4, 2).sum(dim=(3, 5))
    assert_close(grads[2].float(), grad_out.float().sum(dim=(0, 2, 3)), dtype, scale=10.0,
                 msg="bias")  # 96 terms, rounded once to dtype
    assert_close(grads[3].float(), windows, dtype, scale=2.0, msg="top")


def test_the_helpers_name_every_schema_argument():
    for op, helper in ((torch.ops.fpn_kernels.fused_forward, fused_forward),
                       (torch.ops.fpn_kernels.fused_backward, fused_backward)):
        schema = [a.name for a in op.default._schema.arguments]
        source = Path(__file__).with_name("fused_calls.py").read_text()
        body = source[source.index(f"def {helper.__name__}("):]
        for name in schema:
            assert f"{name}=" in body, f"{helper.__name__} does not pass {name!r}"


def test_gpu_tests_call_the_kernels_only_through_the_helpers():
    source = Path(__file__).with_name("test_cuda_backend.py").read_text()
    assert "torch.ops.fpn_kernels.fused_" not in source
