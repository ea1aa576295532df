"""The spec's own backward: ``reference.upsample_adjoint`` (grad_top of the eager backend and of
``upsample_add_conv1x1_reference_backward``).

It must be the adjoint by definition, bit for bit: one ``index_add_`` of the whole gradient,
widened to fp32 (fp64 for fp64), over the output pixels in order, rounded once. The function
instead adds channels_last gradients image by image along pixel rows, and widens in chunks;
random (not integer) gradients make any change in the order of a sum show in the bits, and a
tiny chunk puts chunk boundaries inside every window.
"""

from __future__ import annotations

import pytest
import torch

from fpn_kernels import reference
from fpn_kernels.reference import source_pixel_map, upsample_adjoint

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
        torch.float16: torch.int16}

# (out_hw, top_hw, mode, scale_factor)
GEOMETRIES = {
    "twice": ((20, 38), (10, 19), "nearest", None),  # FPN's 2x
    "twice_odd": ((21, 37), (11, 19), "nearest", None),
    "identity": ((9, 35), (9, 35), "nearest", None),
    "general": ((20, 41), (10, 20), "nearest", (2.05, 2.05)),  # windows of 1, 2 and 3 pixels
    "exact_mode": ((17, 40), (6, 13), "nearest-exact", None),
    "down": ((5, 7), (9, 12), "nearest", None),  # top larger than out: pixels nobody reads
    "one_row": ((1, 40), (1, 20), "nearest", None),
    "eight_x": ((24, 40), (3, 5), "nearest", None),  # 64-pixel windows
}


def by_definition(grad_out: torch.Tensor, top_hw, src: torch.Tensor) -> torch.Tensor:
    n, c, h, w = grad_out.shape
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    grad_top = torch.zeros(n, c, top_hw[0] * top_hw[1], dtype=acc)
    grad_top.index_add_(2, src, grad_out.contiguous().reshape(n, c, h * w).to(acc))
    return grad_top.reshape(n, c, *top_hw).to(grad_out.dtype)


def assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    bits = BITS[actual.dtype]
    assert torch.equal(actual.contiguous().view(bits), expected.contiguous().view(bits))


@pytest.mark.parametrize("chunk", [None, 5], ids=["default_chunk", "tiny_chunk"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_adjoint_has_the_bits_of_its_definition(geometry, dtype, channels_last, n, chunk,
                                                monkeypatch):
    if chunk is not None:
        monkeypatch.setattr(reference, "_WIDEN_CHUNK", chunk)
    out_hw, top_hw, mode, scale_factor = GEOMETRIES[geometry]
    g = torch.Generator().manual_seed(hash((geometry, n)) % 2**31)
    grad_out = (torch.randn(n, 6, *out_hw, generator=g) * 100).to(dtype)
    if channels_last:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    for vectorized in (False, True):  # both ATen index computations
        src = source_pixel_map(top_hw, out_hw, mode, scale_factor, vectorized, dtype, "cpu")
        grad_top = upsample_adjoint(grad_out, top_hw, src)
        assert_same_bits(grad_top, by_definition(grad_out, top_hw, src))
        # The layout follows grad_out's (the op's fake kernel says so for grad_top too).
        assert grad_top.is_contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_adjoint_of_nothing(channels_last):
    """N = 0: an empty grad_top of the right shape, no index_add_ on nothing."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_out = torch.zeros(0, 4, 8, 10).contiguous(memory_format=fmt)
    src = source_pixel_map((4, 5), (8, 10), "nearest", None, channels_last, torch.float32, "cpu")
    assert upsample_adjoint(grad_out, (4, 5), src).shape == (0, 4, 4, 5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fpn_adjoint_is_atens_upsample_backward(dtype, channels_last):
    """On FPN's exact 2x, ATen's CPU upsample backward is the same adjoint, summed in the same
    order: the eager backend's grad_top is then what eager autograd gives, bit for bit."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    g = torch.Generator().manual_seed(0)
    grad_out = torch.randn(2, 16, 24, 38, generator=g).to(dtype).contiguous(memory_format=fmt)
    src = source_pixel_map((12, 19), (24, 38), "nearest", None, channels_last, dtype, "cpu")
    atens = torch.ops.aten.upsample_nearest2d_backward(grad_out, [24, 38], [2, 16, 12, 19])
    assert_same_bits(upsample_adjoint(grad_out, (12, 19), src), atens)
