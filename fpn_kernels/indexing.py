"""Nearest-neighbour source-index math, bit-identical to ATen's upsample kernels.

This is the Python twin of ``csrc/common/nearest_index.h`` (the C++ kernels use that header;
the Triton kernels and the tests use this module); tests check both against ATen itself.

ATen has three index computations for ``F.interpolate(mode="nearest" | "nearest-exact")``, and
which one runs depends on the device, the layout of ``top`` and the output size
(``aten/src/ATen/native/cpu/UpSampleKernel.cpp``, ``UpSample.h``, ``cuda/UpSampleNearest2d.cu``):

``"cpu_channels_last"``: the vectorized CPU kernel, taken when ``top`` is channels_last with
    more than 3 channels, or when ``out_h + out_w <= 128``. float32 math:
    "nearest": ``out == in -> dst``, ``out == 2*in -> dst >> 1``, else
    ``min(floorf(dst * scale), in - 1)``;
    "nearest-exact": ``min(floorf((dst + 0.5) * scale), in - 1)``.
``"cpu_generic"``: every other CPU call. Math in the op's ``opmath`` type (float64 for float64
    tensors, float32 otherwise), no size short-cuts, the result rounded to float32 before
    ``floorf``: "nearest": ``floorf(scale * dst)``; "nearest-exact":
    ``floorf(max(scale * (dst + 0.5) - 0.5, 0) + 0.5)``.
``"cuda"``: float32 math, no short-cuts: "nearest": ``floorf(dst * scale)``; "nearest-exact":
    ``floorf((dst + 0.5f) * scale)``.

``scale`` is ``1 / scale_factor`` when a scale factor is given, else ``in / out``, in the
kernel's math type. The mapping is non-decreasing in ``dst`` for every kernel, so the
destinations that read one source form a contiguous range; the backward kernels use those
ranges (:func:`destination_ranges`) to compute the exact adjoint with no atomics.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

MODES = ("nearest", "nearest-exact")
INDEX_KERNELS = ("cpu_channels_last", "cpu_generic", "cuda")


def takes_vectorized_kernel(top: torch.Tensor) -> bool:
    """Whether ATen's CPU ``F.interpolate(top)`` takes the vectorized (channels-last) kernel for
    every output size: ``top`` is channels_last with more than 3 channels. Depends on the
    layout and the channel count only, never on a spatial size, so it adds no guard on
    symbolic H, W under ``torch.export`` / ``torch.compile(dynamic=True)``."""
    return top.is_contiguous(memory_format=torch.channels_last) and top.shape[1] > 3


def index_kernel_for(device_type: str, top_vectorized: bool, out_hw) -> str:
    """Which ATen index computation runs, from the device, :func:`takes_vectorized_kernel` of
    ``top`` and the output size. Call it only where sizes are concrete (inside a kernel): for
    an NCHW ``top`` on CPU the answer depends on ``out_h + out_w``."""
    if device_type != "cpu":
        return "cuda"
    vectorized = top_vectorized or int(out_hw[0]) + int(out_hw[1]) <= 128
    return "cpu_channels_last" if vectorized else "cpu_generic"


def aten_index_kernel(top: torch.Tensor, out_hw: tuple[int, int] | torch.Size) -> str:
    """Which ATen index computation ``F.interpolate(top, size=out_hw)`` runs for this ``top``."""
    return index_kernel_for(top.device.type, takes_vectorized_kernel(top), out_hw)


def nearest_scale(
    in_size: int, out_size: int, scale_factor: float | None, math: type = np.float32
) -> np.floating:
    """ATen's ``compute_scales_value<T>``: the source step per destination pixel, in ``math``."""
    if scale_factor is not None and scale_factor > 0.0:
        return math(1.0 / scale_factor)
    return math(in_size) / math(out_size)


def _source_indices(in_size, out_size, scale_factor, mode, index_kernel, double_math):
    dst = np.arange(out_size, dtype=np.int64)
    exact = mode == "nearest-exact"
    if index_kernel == "cpu_channels_last" and not exact:
        if out_size == in_size:
            return dst
        if out_size == 2 * in_size:
            return dst >> 1
    if index_kernel == "cpu_generic":
        math = np.float64 if double_math else np.float32
        scale = nearest_scale(in_size, out_size, scale_factor, math)
        if exact:
            half = math(0.5)
            # ATen's `scale * (dst + 0.5) - 0.5` compiles to one fused multiply-add (a single
            # rounding). For float32 math the float64 product and difference are exact, so
            # rounding them once to float32 is that FMA.
            pos = dst.astype(math) + half
            if math is np.float32:
                real = (scale.astype(np.float64) * pos - 0.5).astype(np.float32)
            else:
                real = scale * pos - half
            real = np.maximum(real, math(0)) + half
        else:
            real = scale * dst.astype(math)
        src = np.floor(real.astype(np.float32)).astype(np.int64)  # floorf(float(real))
    else:
        scale = nearest_scale(in_size, out_size, scale_factor)
        pos = dst.astype(np.float32)
        if exact:
            pos = pos + np.float32(0.5)
        src = np.floor(pos * scale).astype(np.int64)  # float32 product, like floorf(dst * scale)
    return np.minimum(src, in_size - 1)


@functools.lru_cache(maxsize=512)
def _cached_indices(in_size, out_size, scale_factor, mode, index_kernel, double_math):
    table = _source_indices(in_size, out_size, scale_factor, mode, index_kernel, double_math)
    table.setflags(write=False)
    return table


def source_indices(
    in_size: int,
    out_size: int,
    scale_factor: float | None = None,
    mode: str = "nearest",
    index_kernel: str = "cpu_channels_last",
    double_math: bool = False,
) -> np.ndarray:
    """int64 array ``src[dst]`` of length ``out_size`` for one spatial axis (read-only, cached).

    ``double_math``: the tensors are float64 (matters for ``"cpu_generic"`` only).
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if index_kernel not in INDEX_KERNELS:
        raise ValueError(f"index_kernel: expected one of {INDEX_KERNELS}, got {index_kernel!r}")
    double_math = bool(double_math) and index_kernel == "cpu_generic"
    return _cached_indices(
        int(in_size), int(out_size), scale_factor, mode, index_kernel, double_math
    )


def destination_ranges(src: np.ndarray, in_size: int) -> np.ndarray:
    """``begin`` (length ``in_size + 1``): source ``s`` is read by ``begin[s] <= dst < begin[s+1]``.

    Valid because ``src`` is non-decreasing; a source nobody reads gets an empty range.
    """
    return np.searchsorted(src, np.arange(in_size + 1), side="left").astype(np.int64)


_device_tables: dict[tuple, torch.Tensor] = {}


def _cached_tensor(key: tuple, build) -> torch.Tensor:
    table = _device_tables.get(key)
    if table is None:
        if len(_device_tables) > 1024:  # bounded: shapes vary in detection training
            _device_tables.clear()
        table = _device_tables[key] = build()
    return table


def index_table_tensor(
    table: str,
    in_size: int,
    out_size: int,
    scale_factor: float | None,
    mode: str,
    index_kernel: str,
    device: torch.device,
    dtype: torch.dtype = torch.int32,
    double_math: bool = False,
) -> torch.Tensor:
    """:func:`index_table` as a tensor on ``device``, cached per device (one copy per shape)."""
    args = (in_size, out_size, scale_factor, mode, index_kernel, double_math)
    return _cached_tensor(
        (table, *args, str(device), dtype),
        lambda: torch.from_numpy(index_table(table, *args)).to(device=device, dtype=dtype),
    )


def index_table(table: str, in_size: int, out_size: int, scale_factor: float | None, mode: str,
                index_kernel: str, double_math: bool = False) -> np.ndarray:
    """One axis's table, a fresh array: ``table="source"``: :func:`source_indices`;
    ``table="ranges"``: :func:`destination_ranges`."""
    sources = source_indices(in_size, out_size, scale_factor, mode, index_kernel, double_math)
    if table == "source":
        return sources.copy()
    if table == "ranges":
        return destination_ranges(sources, in_size)
    raise ValueError(f"table: expected 'source' or 'ranges', got {table!r}")
