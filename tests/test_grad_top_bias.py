"""The CPU backward's one pass over grad_out for grad_top and grad_bias
(csrc/cpu/upsample_add_conv1x1_cpu.cpp: grad_top_bias_kernel).

grad_top's window sums and grad_bias's lanes run the same additions in the same order in
both layouts, so both gradients must have the same bits in NCHW and channels_last, whatever
only one of them is asked for. On integer-valued grad_out every sum is exact, so both must
equal the exact adjoint (an index_add in float64) rounded once to the dtype: a window that
misses, repeats or misplaces a pixel, or a lane that drops a column, fails that.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fused_calls import fused_backward

from fpn_kernels import _cpp
from fpn_kernels.indexing import source_indices

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
INDEX_KERNEL = "cpu_generic"  # one index computation for both layouts (see the docstring)

# (out_hw, top_hw, mode, scale_factor): the window shapes the kernel treats apart.
GEOMETRIES = {
    "twice": ((20, 38), (10, 19), "nearest", None),  # FPN's exact 2x: 2 x 2 windows
    "twice_odd": ((21, 37), (11, 19), "nearest", None),  # last row and column: 1-pixel windows
    "identity": ((9, 35), (9, 35), "nearest", None),
    "general": ((20, 41), (10, 20), "nearest", (2.05, 2.05)),  # windows of 1, 2 and 3 pixels
    "exact_mode": ((17, 40), (6, 13), "nearest-exact", None),
    "down": ((5, 7), (9, 12), "nearest", None),  # top larger than out: empty windows
    "one_row": ((1, 40), (1, 20), "nearest", None),
}


@pytest.fixture(autouse=True)
def cpu_library():
    reason = _cpp.load("_C")
    if reason is not None:
        pytest.skip(reason)


def exact_adjoint(grad_out: torch.Tensor, top_hw, mode: str, scale_factor) -> torch.Tensor:
    """(N, C, top_h, top_w) float64: each output pixel's gradient added to the top pixel the
    forward gathered for it (the index tables of INDEX_KERNEL)."""
    n, c, h, w = grad_out.shape
    sf = (None, None) if scale_factor is None else scale_factor
    rows = source_indices(top_hw[0], h, sf[0], mode, INDEX_KERNEL)
    cols = source_indices(top_hw[1], w, sf[1], mode, INDEX_KERNEL)
    source = torch.from_numpy((rows[:, None] * top_hw[1] + cols[None, :]).astype(np.int64))
    adjoint = torch.zeros(n, c, top_hw[0] * top_hw[1], dtype=torch.float64)
    adjoint.index_add_(2, source.reshape(-1), grad_out.double().reshape(n, c, h * w))
    return adjoint.reshape(n, c, *top_hw)


def backward(grad_out, top_hw, mode, scale_factor, channels_last, needs):
    n, c_out = grad_out.shape[:2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    lateral = torch.zeros(n, 3, *grad_out.shape[2:], dtype=grad_out.dtype).contiguous(
        memory_format=fmt)
    weight = torch.zeros(c_out, 3, dtype=grad_out.dtype)
    _, _, grad_bias, grad_top = fused_backward(
        grad_out.contiguous(memory_format=fmt), lateral, weight, top_hw, mode,
        None if scale_factor is None else list(scale_factor), channels_last,
        needs=[False, False, needs[0], needs[1]], index_kernel=INDEX_KERNEL)
    return grad_bias, grad_top


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_grad_top_and_bias_are_exact_and_the_same_in_both_layouts(geometry, dtype):
    out_hw, top_hw, mode, scale_factor = GEOMETRIES[geometry]
    # 19 channels: a vector body and a tail in channels_last; integers in [-3, 3]: exact sums.
    g = torch.Generator().manual_seed(3)
    grad_out = torch.randint(-3, 4, (2, 19, *out_hw), generator=g).to(dtype)
    adjoint = exact_adjoint(grad_out, top_hw, mode, scale_factor)
    for channels_last in (False, True):
        grad_bias, grad_top = backward(grad_out, top_hw, mode, scale_factor, channels_last,
                                       (True, True))
        assert grad_top.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        assert torch.equal(grad_top, adjoint.to(dtype)), f"grad_top, channels_last={channels_last}"
        assert torch.equal(grad_bias, adjoint.sum((0, 2, 3)).to(dtype)), (
            f"grad_bias, channels_last={channels_last}")
        # Asked for alone, each is the same pass with the other left out: the same bits.
        only_bias, empty_top = backward(grad_out, top_hw, mode, scale_factor, channels_last,
                                        (True, False))
        empty_bias, only_top = backward(grad_out, top_hw, mode, scale_factor, channels_last,
                                        (False, True))
        assert empty_top.numel() == 0 and empty_bias.numel() == 0
        assert torch.equal(only_bias, grad_bias) and torch.equal(only_top, grad_top)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("geometry", ["twice", "general", "down"])
def test_rounded_sums_have_the_same_bits_in_both_layouts(geometry, dtype):
    """Unit-scale random grad_out (every sum rounds): the additions, not only their exact
    result, are the same in both layouts."""
    out_hw, top_hw, mode, scale_factor = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(4)
    grad_out = torch.randn(2, 37, *out_hw, generator=g).to(dtype)
    nchw = backward(grad_out, top_hw, mode, scale_factor, False, (True, True))
    channels_last = backward(grad_out, top_hw, mode, scale_factor, True, (True, True))
    assert torch.equal(nchw[0], channels_last[0]), "grad_bias"
    assert torch.equal(nchw[1], channels_last[1]), "grad_top"
