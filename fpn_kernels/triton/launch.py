"""Host side of the Triton backend: index tables, config choice, grids and launches.

``forward`` and ``backward`` follow the backend contract in ``fpn_kernels/backends.py`` (inputs
already normalized by ``ops.py``). Under ``TRITON_INTERPRET=1`` they run the same kernels on CPU
tensors with one fixed config per kernel.

Config choice. The forward is autotuned (``triton.autotune`` over the curated list in
``kernels.py``, keyed on C_in, C_out, pixel count, width, layout and dtype). The backward never
times anything: its configs, and the pixel split of the grad_weight reduction, follow from the
shape alone, so its bits cannot depend on which config won a benchmark. The forward does the
same under ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
import triton
from torch import Tensor

from .. import _eager_backend
from ..indexing import (
    destination_ranges,
    index_table_tensor,
    source_indices,
)
from ..precision import cudnn_conv_allows_tf32
from . import kernels

# The kernels were built for the interpreter iff this was set when kernels.py was imported.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# Offsets inside one image are int32 unless an image holds this many elements or more (the
# image's base offset is always int64). A module constant so tests can lower it.
INT64_INDEX_FROM = 2**31

# Rule-based config choice aims for at least this many programs: two waves on a 132-SM H100.
# A shape-only constant, never read from the device, so the choice is the same on every GPU.
MIN_PROGRAMS = 264

# Largest grid dimension 1 (CUDA's limit for gridDim.y).
MAX_GRID_Y = 65535


# --------------------------------------------------------------------------- small helpers


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _axis_scales(scale_factor: Sequence[float] | None) -> tuple[float | None, float | None]:
    if scale_factor is None:
        return None, None
    return float(scale_factor[0]), float(scale_factor[1])


def _dot_flags(t: Tensor) -> dict:
    """What eager conv2d would do: fp32 as TF32 on CUDA iff cuDNN may use TF32 (CPU eager is
    IEEE fp32); 16-bit operands always multiply exactly with fp32 accumulation."""
    tf32 = t.device.type == "cuda" and cudnn_conv_allows_tf32()
    ieee = t.dtype == torch.float32 and not tf32
    return {
        "DOT_PRECISION": "ieee" if ieee else "tf32",
        "DOT_IN_FP32": INTERPRETING and t.dtype == torch.bfloat16,
    }


def _int64_index(*per_image_numels: int) -> bool:
    return max(per_image_numels) >= INT64_INDEX_FROM


def pixel_align(pixels: int) -> int:
    """The largest power of two (at most 16) dividing the pixel count: a compile-time hint that
    lets NCHW rows (stride P) load and store as vectors when P is, say, 3800 = 8 * 475."""
    return min(16, pixels & -pixels)


def _check_batch(n: int) -> None:
    """Images are grid dimension 1 (forward, grad_lateral, grad_top)."""
    if n > MAX_GRID_Y:
        raise ValueError(f"triton backend: batch size {n} exceeds the grid limit {MAX_GRID_Y}")


def _pick(configs: Sequence[triton.Config], fits: Callable[[dict], bool]) -> triton.Config:
    """The first config (lists go from the largest tile to the smallest) that ``fits``, else the
    smallest."""
    return next((c for c in configs if fits(c.kwargs)), configs[-1])


def _launch(kernel, grid, args, flags: dict, config: triton.Config) -> None:
    kernel[grid](*args, **flags, **config.all_kwargs())


_int32_placeholders: dict[str, Tensor] = {}


def _int32_placeholder(device: torch.device) -> Tensor:
    """A stand-in for index tables a launch does not read (a pointer argument needs a tensor)."""
    key = str(device)
    if key not in _int32_placeholders:
        _int32_placeholders[key] = torch.zeros(1, dtype=torch.int32, device=device)
    return _int32_placeholders[key]


# --------------------------------------------------------------------------- 1x1 conv (+ epilogue)


def _forward_configs(configs, named_args, **kwargs):
    return kernels.UPSAMPLE_ADD_CONV1X1_CONFIGS[named_args["lateral_ptr"].element_size()]


_upsample_add_conv1x1_autotuned = triton.autotune(
    configs=[c for cs in kernels.UPSAMPLE_ADD_CONV1X1_CONFIGS.values() for c in cs],
    key=["C_in", "C_out", "P", "W", "CHANNELS_LAST"],  # triton adds the tensors' dtypes
    prune_configs_by={"early_config_prune": _forward_configs},
)(kernels.upsample_add_conv1x1_kernel)


def _conv1x1(
    lateral: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    top: Tensor | None,
    src_tables: tuple[Tensor, Tensor] | None,
    channels_last: bool,
    autotune: bool,
) -> Tensor:
    """``weight @ lateral (+ bias) (+ top[src_tables])`` per image, one launch."""
    n, c_in, height, width = lateral.shape
    c_out = weight.shape[0]
    pixels = height * width
    out = torch.empty((n, c_out, height, width), device=lateral.device, dtype=lateral.dtype,
                      memory_format=_memory_format(channels_last))
    top_h, top_w = top.shape[2:] if top is not None else (0, 0)
    no_table = _int32_placeholder(lateral.device)
    src_row, src_col = src_tables if src_tables is not None else (no_table, no_table)
    args = (
        lateral, weight, bias if bias is not None else out, top if top is not None else out,
        src_row, src_col, out, c_in, c_out, pixels, width, top_h, top_w,
    )
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_TOP=top is not None,
        CHANNELS_LAST=channels_last,
        INT64_INDEX=_int64_index(lateral[0].numel(), out[0].numel(),
                                 top[0].numel() if top is not None else 0),
        PIXEL_ALIGN=pixel_align(pixels),
        **_dot_flags(lateral),
    )

    def programs(meta: dict) -> int:
        return triton.cdiv(c_out, meta["BLOCK_CO"]) * triton.cdiv(pixels, meta["BLOCK_P"])

    if INTERPRETING:
        _launch(kernels.upsample_add_conv1x1_kernel,
                (programs(kernels.UPSAMPLE_ADD_CONV1X1_INTERPRET_CONFIG.kwargs), n), args, flags,
                kernels.UPSAMPLE_ADD_CONV1X1_INTERPRET_CONFIG)
    elif autotune and not torch.are_deterministic_algorithms_enabled():
        _upsample_add_conv1x1_autotuned[lambda meta: (programs(meta), n)](*args, **flags)
    else:
        configs = kernels.UPSAMPLE_ADD_CONV1X1_CONFIGS[lateral.element_size()]
        config = _pick(configs, lambda meta: programs(meta) * n >= MIN_PROGRAMS)
        _launch(kernels.upsample_add_conv1x1_kernel, (programs(config.kwargs), n), args, flags,
                config)
    return out


# --------------------------------------------------------------------------- grad_weight, grad_bias


def _weight_grad_config(c_out: int, c_in: int, element_size: int) -> triton.Config:
    """The largest tile that is at least half filled along both channel axes."""
    if INTERPRETING:
        return kernels.CONV1X1_WEIGHT_GRAD_INTERPRET_CONFIG

    def fits(meta: dict) -> bool:
        return all(triton.cdiv(c, block) * block <= 2 * c
                   for c, block in ((c_out, meta["BLOCK_CO"]), (c_in, meta["BLOCK_CI"])))

    return _pick(kernels.CONV1X1_WEIGHT_GRAD_CONFIGS[element_size], fits)


def weight_grad_split(n: int, pixels: int, tiles: int, block_k: int) -> tuple[int, int]:
    """(chunk_pixels, chunks_per_image) of the grad_weight reduction: the largest chunk that
    still gives MIN_PROGRAMS programs, at least 8 pixel steps per program, a grid dimension
    within CUDA's limit. A function of the shape and config only, hence deterministic."""
    chunk = max(8 * block_k, n * pixels * tiles // MIN_PROGRAMS,
                triton.cdiv(pixels, max(1, MAX_GRID_Y // n)))
    chunk = min(triton.cdiv(chunk, block_k) * block_k, triton.cdiv(pixels, block_k) * block_k)
    return chunk, triton.cdiv(pixels, chunk)


def _ordered_sum(partial: Tensor, out: Tensor) -> None:
    """out = partial.sum(0) in split order (fp32), cast to out's dtype."""
    numel = out.numel()
    config = (kernels.ORDERED_SUM_INTERPRET_CONFIG if INTERPRETING
              else kernels.ORDERED_SUM_CONFIGS[0])
    grid = (triton.cdiv(numel, config.kwargs["BLOCK"]),)
    _launch(kernels.ordered_sum_kernel, grid, (partial, out, partial.shape[0], numel), {},
            config)


def _weight_and_bias_grad(
    grad_out: Tensor, lateral: Tensor, channels_last: bool, need_bias: bool
) -> tuple[Tensor, Tensor | None]:
    n, c_in, height, width = lateral.shape
    c_out = grad_out.shape[1]
    pixels = height * width
    config = _weight_grad_config(c_out, c_in, lateral.element_size())
    meta = config.kwargs
    tiles = triton.cdiv(c_out, meta["BLOCK_CO"]) * triton.cdiv(c_in, meta["BLOCK_CI"])
    chunk, chunks_per_image = weight_grad_split(n, pixels, tiles, meta["BLOCK_K"])
    splits = n * chunks_per_image
    f32 = dict(device=lateral.device, dtype=torch.float32)
    weight_partial = torch.empty((splits, c_out, c_in), **f32)
    bias_partial = torch.empty((splits, c_out), **f32) if need_bias else weight_partial
    flags = dict(
        HAS_BIAS=need_bias,
        CHANNELS_LAST=channels_last,
        INT64_INDEX=_int64_index(lateral[0].numel(), grad_out[0].numel()),
        PIXEL_ALIGN=pixel_align(pixels),
        **_dot_flags(lateral),
    )
    args = (grad_out, lateral, weight_partial, bias_partial, c_in, c_out, pixels, chunk,
            chunks_per_image)
    _launch(kernels.conv1x1_weight_grad_kernel, (tiles, splits), args, flags, config)
    grad_weight = torch.empty((c_out, c_in), device=lateral.device, dtype=lateral.dtype)
    _ordered_sum(weight_partial, grad_weight)
    grad_bias = None
    if need_bias:
        grad_bias = torch.empty((c_out,), device=lateral.device, dtype=lateral.dtype)
        _ordered_sum(bias_partial, grad_bias)
    return grad_weight, grad_bias


# --------------------------------------------------------------------------- grad_top


def _longest_range(in_size: int, out_size: int, scale: float | None, mode: str,
                   index_kernel: str) -> int:
    """The most destination pixels any one source pixel feeds, on one axis (host-side, cached
    tables: no device sync)."""
    src = source_indices(in_size, out_size, scale, mode, index_kernel)
    return int(np.diff(destination_ranges(src, in_size)).max())


def _upsample_grad(grad_out: Tensor, top_hw: Sequence[int], mode: str,
                   scale_factor: Sequence[float] | None, channels_last: bool,
                   index_kernel: str) -> Tensor:
    """grad_top: the exact adjoint of the forward's gather (the same index tables)."""
    n, c_out, height, width = grad_out.shape
    top_h, top_w = (int(s) for s in top_hw)
    scale_h, scale_w = _axis_scales(scale_factor)
    tables = [
        index_table_tensor("ranges", top_size, size, scale, mode, index_kernel, grad_out.device)
        for top_size, size, scale in ((top_h, height, scale_h), (top_w, width, scale_w))
    ]
    max_rows = _longest_range(top_h, height, scale_h, mode, index_kernel)
    max_cols = _longest_range(top_w, width, scale_w, mode, index_kernel)
    grad_top = torch.empty((n, c_out, top_h, top_w), device=grad_out.device, dtype=grad_out.dtype,
                           memory_format=_memory_format(channels_last))
    config = (kernels.NEAREST_UPSAMPLE_GRAD_INTERPRET_CONFIG if INTERPRETING
              else kernels.NEAREST_UPSAMPLE_GRAD_CONFIGS[grad_out.element_size()][0])
    meta = config.kwargs
    grid = (triton.cdiv(c_out, meta["BLOCK_C"]) * triton.cdiv(top_h * top_w, meta["BLOCK_T"]), n)
    args = (grad_out, *tables, grad_top, c_out, height, width, top_h, top_w, max_rows, max_cols)
    flags = dict(CHANNELS_LAST=channels_last,
                 INT64_INDEX=_int64_index(grad_out[0].numel(), grad_top[0].numel()))
    _launch(kernels.nearest_upsample_grad_kernel, grid, args, flags, config)
    return grad_top


# --------------------------------------------------------------------------- the backend contract


def _degenerate(*tensors: Tensor) -> bool:
    return any(t.numel() == 0 for t in tensors)


def forward(lateral: Tensor, weight: Tensor, bias: Tensor | None, top: Tensor, mode: str,
            scale_factor: Sequence[float] | None, channels_last: bool,
            index_kernel: str) -> Tensor:
    if _degenerate(lateral, weight, top):  # zero-sized: eager's answer, as ops.py gives
        return _eager_backend.forward(lateral, weight, bias, top, mode, scale_factor,
                                      channels_last, index_kernel)
    n, _, height, width = lateral.shape
    _check_batch(n)
    top_h, top_w = top.shape[2:]
    scale_h, scale_w = _axis_scales(scale_factor)
    # index_kernel: the ATen index computation eager's interpolate runs for the caller's top
    # (it differs by device, and on CPU by layout and size). The tables come from the one
    # implementation of that math, fpn_kernels.indexing.
    src_tables = (
        index_table_tensor("source", top_h, height, scale_h, mode, index_kernel, lateral.device),
        index_table_tensor("source", top_w, width, scale_w, mode, index_kernel, lateral.device),
    )
    return _conv1x1(lateral, weight, bias, top, src_tables, channels_last, autotune=True)


def backward(grad_out: Tensor, lateral: Tensor, weight: Tensor, top_hw: Sequence[int], mode: str,
             scale_factor: Sequence[float] | None, channels_last: bool, index_kernel: str,
             needs: Sequence[bool]):
    if _degenerate(grad_out, lateral, weight):
        return _eager_backend.backward(grad_out, lateral, weight, top_hw, mode, scale_factor,
                                       channels_last, index_kernel, needs)
    _check_batch(grad_out.shape[0])
    need_lateral, need_weight, need_bias, need_top = (bool(x) for x in needs)
    grad_lateral = grad_weight = grad_bias = grad_top = None
    if need_lateral:  # grad_lateral = weight^T @ grad_out: the forward kernel, no epilogue
        grad_lateral = _conv1x1(grad_out, weight.t().contiguous(), None, None, None,
                                channels_last, autotune=False)
    if need_weight or need_bias:
        grad_weight, grad_bias = _weight_and_bias_grad(grad_out, lateral, channels_last,
                                                       need_bias)
    if need_top:
        grad_top = _upsample_grad(grad_out, top_hw, mode, scale_factor, channels_last,
                                  index_kernel)
    return grad_lateral, grad_weight if need_weight else None, grad_bias, grad_top
