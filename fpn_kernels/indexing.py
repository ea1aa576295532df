"""Nearest-neighbour source-index math, bit-identical to ATen's ``UpSample.h``.

This is the Python twin of ``csrc/common/nearest_index.h`` (the C++ kernels use that header;
the Triton kernels and the tests use this module). Both follow ATen exactly:

* ``scale = (float32)(1.0 / scale_factor)`` when a scale factor is given, else
  ``(float32)in_size / (float32)out_size``;
* "nearest": ``src = min(floorf((float32)dst * scale), in_size - 1)``; ATen's CPU kernel
  short-cuts ``out == in`` (``src = dst``) and ``out == 2 * in`` (``src = dst >> 1``) first,
  even when a scale factor was given, its CUDA kernel does not (``size_shortcuts``);
* "nearest-exact": ``src = min(floorf(((float32)dst + 0.5f) * scale), in_size - 1)``.

All arithmetic is float32 (numpy scalars), exactly as ATen writes it: a float64 shortcut gives
different indices for some sizes. The mapping is monotone non-decreasing in ``dst``, so the
destinations that read one source form a contiguous range; the backward kernels use those ranges
(:func:`destination_ranges`) to compute the exact adjoint with no atomics.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

MODES = ("nearest", "nearest-exact")


def nearest_scale(in_size: int, out_size: int, scale_factor: float | None) -> np.float32:
    """ATen's ``compute_scales_value<float>``: the float32 source step per destination pixel."""
    if scale_factor is not None and scale_factor > 0.0:
        return np.float32(1.0 / scale_factor)
    return np.float32(in_size) / np.float32(out_size)


def _source_indices(
    in_size: int, out_size: int, scale_factor: float | None, mode: str, size_shortcuts: bool
) -> np.ndarray:
    dst = np.arange(out_size, dtype=np.int64)
    if mode == "nearest" and size_shortcuts:
        if out_size == in_size:
            return dst
        if out_size == 2 * in_size:
            return dst >> 1
    scale = nearest_scale(in_size, out_size, scale_factor)
    dst_f = dst.astype(np.float32)
    if mode == "nearest-exact":
        dst_f = dst_f + np.float32(0.5)
    src = np.floor(dst_f * scale).astype(np.int64)  # float32 product, like floorf(dst * scale)
    return np.minimum(src, in_size - 1)


@functools.lru_cache(maxsize=256)
def _cached_indices(
    in_size: int, out_size: int, scale_factor: float | None, mode: str, size_shortcuts: bool
) -> np.ndarray:
    table = _source_indices(in_size, out_size, scale_factor, mode, size_shortcuts)
    table.setflags(write=False)
    return table


def source_indices(
    in_size: int,
    out_size: int,
    scale_factor: float | None = None,
    mode: str = "nearest",
    size_shortcuts: bool = True,
) -> np.ndarray:
    """int64 array ``src[dst]`` of length ``out_size`` for one spatial axis (read-only, cached)."""
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return _cached_indices(int(in_size), int(out_size), scale_factor, mode, bool(size_shortcuts))


def destination_ranges(src: np.ndarray, in_size: int) -> np.ndarray:
    """``begin`` of length ``in_size + 1``: source ``s`` is read by ``dst in [begin[s], begin[s+1])``.

    Valid because ``src`` is non-decreasing; a source nobody reads gets an empty range.
    """
    return np.searchsorted(src, np.arange(in_size + 1), side="left").astype(np.int64)


_device_tables: dict[tuple, torch.Tensor] = {}


def source_index_tensor(
    in_size: int,
    out_size: int,
    scale_factor: float | None,
    mode: str,
    size_shortcuts: bool,
    device: torch.device,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """:func:`source_indices` as a tensor on ``device`` (cached per device: one copy per shape)."""
    key = (in_size, out_size, scale_factor, mode, size_shortcuts, str(device), dtype)
    table = _device_tables.get(key)
    if table is None:
        host = source_indices(in_size, out_size, scale_factor, mode, size_shortcuts)
        table = torch.from_numpy(host.copy()).to(device=device, dtype=dtype)
        if len(_device_tables) > 1024:  # bounded: shapes vary in detection training
            _device_tables.clear()
        _device_tables[key] = table
    return table


def destination_range_tensor(
    in_size: int,
    out_size: int,
    scale_factor: float | None,
    mode: str,
    size_shortcuts: bool,
    device: torch.device,
    dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """:func:`destination_ranges` of that axis as a tensor on ``device`` (cached per device)."""
    key = ("ranges", in_size, out_size, scale_factor, mode, size_shortcuts, str(device), dtype)
    table = _device_tables.get(key)
    if table is None:
        src = source_indices(in_size, out_size, scale_factor, mode, size_shortcuts)
        host = destination_ranges(src, in_size)
        table = torch.from_numpy(host).to(device=device, dtype=dtype)
        if len(_device_tables) > 1024:
            _device_tables.clear()
        _device_tables[key] = table
    return table
