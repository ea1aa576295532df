"""The nearest index math, against ATen itself, for every copy of it.

fpn_kernels/indexing.py (Python, used by Triton) and csrc/common/nearest_index.h (C++, used by
the CPU and CUDA kernels) must be bit-identical to the ATen kernel F.interpolate runs, which
depends on top's layout, its channels, the output size and the dtype (indexing.py explains).
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fpn_kernels
from fpn_kernels.indexing import (
    aten_index_kernel,
    destination_ranges,
    nearest_scale,
    source_indices,
)

MODES = ("nearest", "nearest-exact")
HAVE_CPU = "cpu" in fpn_kernels.available_backends()


def probe_top(in_w: int, dtype: torch.dtype, channels_last: bool, channels: int) -> torch.Tensor:
    top = torch.arange(in_w, dtype=torch.float64).reshape(1, 1, 1, in_w)
    top = top.expand(1, channels, 2, in_w).to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return top.contiguous(memory_format=fmt)


def aten_indices(top, out_h, out_w, mode, scale_factor=None) -> np.ndarray:
    """Source columns ATen reads along W, read back from an arange input."""
    if scale_factor is None:
        out = F.interpolate(top, size=(out_h, out_w), mode=mode)
    else:
        out = F.interpolate(top, scale_factor=(out_h / top.shape[2], scale_factor), mode=mode)
        assert out.shape[-1] == out_w
    return out[0, 0, 0].double().long().numpy()


SIZES = [(i, o) for i in (1, 2, 3, 5, 7, 10, 19, 25, 38, 76, 152, 304, 333)
         for o in range(1, 1001, 13)]
# (dtype, channels_last, channels, out_h): covers the vectorized kernel (channels_last, C > 3,
# or out_h + out_w <= 128) and the generic one (float32 and float64 math).
LAYOUTS = [(torch.float32, False, 2, 2), (torch.float32, False, 2, 200),
           (torch.float32, True, 4, 200), (torch.float32, True, 2, 200),
           (torch.float64, False, 2, 200), (torch.float64, True, 4, 200),
           (torch.bfloat16, False, 2, 200)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,channels_last,channels,out_h", LAYOUTS)
def test_python_indices_match_aten_sizes(mode, dtype, channels_last, channels, out_h):
    seen = set()
    for in_w, out_w in SIZES:
        if dtype == torch.bfloat16 and in_w > 256:
            continue  # arange values must stay exact in the dtype
        top = probe_top(in_w, dtype, channels_last, channels)
        kernel = aten_index_kernel(top, (out_h, out_w))
        seen.add(kernel)
        got = source_indices(in_w, out_w, None, mode, kernel, dtype == torch.float64)
        assert np.array_equal(got, aten_indices(top, out_h, out_w, mode)), (in_w, out_w, kernel)
    assert seen  # the sweep ran


def scale_cases():
    rng = random.Random(0)
    cases = [(10, 2.05), (5, 2.0), (7, 1.5), (25, 2.0), (38, 2.0), (13, 3.0), (9, 0.5)]
    cases += [(rng.randint(1, 150), round(rng.uniform(0.3, 4.0), 3)) for _ in range(60)]
    return [(i, s) for i, s in cases if int(np.floor(i * s)) >= 1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,channels_last,channels,out_h", LAYOUTS[:6])
def test_python_indices_match_aten_scale_factor(mode, dtype, channels_last, channels, out_h):
    for in_w, scale in scale_cases():
        out_w = int(np.floor(in_w * scale))
        top = probe_top(in_w, dtype, channels_last, channels)
        kernel = aten_index_kernel(top, (out_h, out_w))
        got = source_indices(in_w, out_w, scale, mode, kernel, dtype == torch.float64)
        expected = aten_indices(top, out_h, out_w, mode, scale)
        assert np.array_equal(got, expected), (in_w, scale, kernel)


def test_kernel_choice_follows_aten_dispatch():
    nchw = torch.zeros(1, 8, 5, 5)
    assert aten_index_kernel(nchw, (100, 100)) == "cpu_generic"
    assert aten_index_kernel(nchw, (64, 64)) == "cpu_channels_last"  # out_h + out_w <= 128
    cl = nchw.contiguous(memory_format=torch.channels_last)
    assert aten_index_kernel(cl, (100, 100)) == "cpu_channels_last"
    assert aten_index_kernel(cl[:, :3], (100, 100)) == "cpu_generic"  # C <= 3
    assert aten_index_kernel(torch.zeros(1, 8, 5, 5, device="meta"), (9, 9)) == "cuda"


def test_the_three_kernels_differ_where_aten_does():
    # Width 10, scale_factor 2.05: the vectorized CPU kernel short-cuts out == 2*in (dst >> 1);
    # the generic CPU kernel and CUDA (UpSample.cuh) use floor(dst * (float)(1 / 2.05)).
    assert list(source_indices(10, 20, 2.05, "nearest", "cpu_channels_last")[:5]) == [0, 0, 1, 1, 2]
    assert list(source_indices(10, 20, 2.05, "nearest", "cpu_generic")[:5]) == [0, 0, 0, 1, 1]
    cuda = source_indices(10, 20, 2.05, "nearest", "cuda")
    scale = np.float32(1.0 / 2.05)
    assert list(cuda) == [min(int(np.floor(np.float32(d) * scale)), 9) for d in range(20)]
    # float64 tensors on the generic CPU kernel use double math (304 -> 1000, dst 812).
    exact32 = source_indices(304, 1000, None, "nearest-exact", "cpu_generic", double_math=False)
    exact64 = source_indices(304, 1000, None, "nearest-exact", "cpu_generic", double_math=True)
    assert (exact32[812], exact64[812]) == (246, 247)


def test_scale_is_computed_in_the_kernels_math_type():
    assert nearest_scale(3, 7, None) == np.float32(3) / np.float32(7)
    assert nearest_scale(3, 7, 2.05) == np.float32(1.0 / 2.05)
    assert nearest_scale(3, 7, None, np.float64) == 3 / 7


@pytest.mark.parametrize("kernel", ["cpu_channels_last", "cpu_generic", "cuda"])
@pytest.mark.parametrize("mode", MODES)
def test_destination_ranges_are_the_adjoint(mode, kernel):
    for in_size, out_size in [(5, 10), (10, 19), (7, 3), (38, 75), (1, 5), (9, 9), (20, 7)]:
        src = source_indices(in_size, out_size, None, mode, kernel)
        assert np.all(np.diff(src) >= 0)  # monotone: ranges are contiguous
        begin = destination_ranges(src, in_size)
        for s in range(in_size):
            readers = list(np.flatnonzero(src == s))
            assert list(range(begin[s], begin[s + 1])) == readers, (in_size, out_size, s)


def gather_through_cpu_kernel(top, out_hw, mode, scale_factor=None):
    """out = 0 @ lateral + top gathered: the C++ kernel's index math, observed exactly."""
    lateral = torch.zeros(1, 1, *out_hw, dtype=top.dtype)
    weight = torch.zeros(top.shape[1], 1, 1, 1, dtype=top.dtype)
    return fpn_kernels.upsample_add_conv1x1(lateral, weight, None, top, mode=mode,
                                            scale_factor=scale_factor, backend="cpu")


@pytest.mark.skipif(not HAVE_CPU, reason="C++ extension absent")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype,channels_last,channels", [
    (torch.float32, False, 1), (torch.float32, True, 4), (torch.float64, False, 1),
    (torch.float64, True, 4),
])
def test_cpp_header_matches_aten(mode, dtype, channels_last, channels):
    cases = [(i, o) for i, o in itertools.product((1, 3, 5, 10, 25, 38, 50, 76), range(1, 160, 9))
             if o <= 4 * i + 3]
    for (in_h, out_h), (in_w, out_w) in zip(cases, reversed(cases), strict=True):
        top = torch.arange(in_h * in_w, dtype=dtype).reshape(1, 1, in_h, in_w)
        top = top.expand(1, channels, in_h, in_w).contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        got = gather_through_cpu_kernel(top, (out_h, out_w), mode)
        expected = F.interpolate(top, size=(out_h, out_w), mode=mode)
        assert torch.equal(got[:, :1], expected[:, :1]), (in_h, out_h, in_w, out_w)


@pytest.mark.skipif(not HAVE_CPU, reason="C++ extension absent")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpp_header_matches_aten_scale_factor(dtype):
    for in_size, scale in scale_cases():
        top = torch.arange(in_size * 3, dtype=dtype).reshape(1, 1, 3, in_size)
        out_hw = (int(np.floor(3 * scale)), int(np.floor(in_size * scale)))
        for mode in MODES:
            got = gather_through_cpu_kernel(top, out_hw, mode, scale)
            expected = F.interpolate(top, scale_factor=scale, mode=mode)
            assert torch.equal(got, expected), (in_size, scale, mode)
