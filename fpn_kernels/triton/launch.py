"""Host side of the Triton backend: index tables, config choice, grids and launches.

``forward`` and ``backward`` follow the backend contract in ``fpn_kernels/backends.py`` (inputs
already normalized by ``ops.py``). Under ``TRITON_INTERPRET=1`` they run the same kernels on CPU
tensors with one fixed config per kernel.

Config choice: rule-based, from the shape alone, never timed (``_pick`` over the curated lists
in ``kernels.py``). So a new image size (multi-scale training, variable-size evaluation) never
benchmarks anything or syncs the device, a call inside CUDA-graph capture never tunes, and the
bits cannot depend on which config won a benchmark. The kernels do not specialize on image
sizes (``do_not_specialize``): a new size reuses the compiled kernel unless its pixel count's
power-of-two alignment (PIXEL_ALIGN) or the picked config is new
(tests/test_triton_compiles.py counts the JIT's cache keys over 20 image sizes).

CUDA tensors: the kernels compute ATen's CUDA nearest index themselves (``kernels.
_nearest_source``, float32 scales from ``indexing.nearest_scale``), so a call allocates
nothing but its outputs and fp32 scratch (from torch's caching allocator) and never copies to
the device or syncs: safe inside ``torch.cuda.graph`` capture and on a new shape under
``torch.compile(mode="reduce-overhead")``. The host index tables (``indexing.
index_table_tensor``) serve only ATen's CPU index kernels, i.e. CPU tensors under the
interpreter.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import types
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
import triton
from torch import Tensor

from .. import _eager_backend
from ..indexing import (
    destination_ranges,
    index_table,
    index_table_tensor,
    nearest_scale,
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
        "DOT_TF32": not ieee,
        "DOT_IN_FP32": INTERPRETING and t.dtype == torch.bfloat16,
    }


def _int64_index(*per_image_numels: int) -> bool:
    return max(per_image_numels) >= INT64_INDEX_FROM


def pixel_align(pixels: int, channels_last: bool = False) -> int:
    """The largest power of two (at most 16) dividing the pixel count: a compile-time hint that
    lets NCHW rows (stride P) load and store as vectors when P is, say, 3800 = 8 * 475.
    channels_last rows have stride C, so there it is 1: one compile for every image size."""
    return 1 if channels_last else min(16, pixels & -pixels)


def _pick(configs: Sequence[tuple[int, triton.Config]],
          fits: Callable[[dict], bool]) -> tuple[int, triton.Config]:
    """The first (index, config) (lists go from the largest tile to the smallest) whose config
    ``fits``, else the smallest."""
    return next(((i, c) for i, c in configs if fits(c.kwargs)), configs[-1])


# ``traced_launches()`` sets this (per thread) while fpn_kernels.triton.graph decomposes an op
# into its launches for torch.compile / AOTInductor.
_tracing = threading.local()


@contextlib.contextmanager
def traced_launches() -> Iterator[None]:
    """Every launch inside goes through ``torch.library.wrap_triton``: under a tracer (the
    AOTDispatcher) it becomes a ``triton_kernel_wrapper_*`` graph node, which Inductor compiles
    as a user-defined kernel. Outside, launches are plain ``kernel[grid](...)`` calls (what
    ``triton_op`` does for eager with ``set_wrap_triton_enabled(False)``): no higher-order op
    dispatch, no kernel side-table entry per call."""
    from torch._library.triton import set_wrap_triton_enabled

    previous = tracing()
    _tracing.on = True
    try:
        with set_wrap_triton_enabled(True):
            yield
    finally:
        _tracing.on = previous


def tracing() -> bool:
    return getattr(_tracing, "on", False)


class _InterpretedJIT(triton.runtime.jit.JITFunction):
    """Under TRITON_INTERPRET=1 ``triton.jit`` returns an InterpretedFunction, which
    ``wrap_triton`` passes through untraced (torch 2.14) or refuses (2.11). This twin is a
    JITFunction of the same source (its helpers twins too, see ``_jit_twins``), so the traced
    graph is the one a GPU run traces, the kernel's TTIR included, while its launches run the
    interpreter on CPU tensors."""

    def __init__(self, interpreted, fn):
        super().__init__(fn, do_not_specialize=interpreted.kwargs.get("do_not_specialize"))
        self.interpreted = interpreted

    def run(self, *args, grid, warmup, **kwargs):
        return self.interpreted.run(*args, grid=grid, warmup=warmup, **kwargs)


@functools.cache
def _jit_twins() -> dict[int, _InterpretedJIT]:
    """A twin per InterpretedFunction in kernels.py (kernels and helpers), keyed by id: each
    twin's function reads a copy of the module's globals in which the helpers are twins."""
    from triton.runtime.interpreter import InterpretedFunction

    namespace = dict(vars(kernels))
    originals = {name: value for name, value in namespace.items()
                 if isinstance(value, InterpretedFunction)}
    for name, interpreted in originals.items():
        fn = interpreted.fn
        twin_fn = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__,
                                     fn.__closure__)
        twin_fn.__qualname__ = fn.__qualname__
        namespace[name] = _InterpretedJIT(interpreted, twin_fn)
    return {id(interpreted): namespace[name] for name, interpreted in originals.items()}


def traceable(kernel):
    """``kernel`` as ``wrap_triton`` takes it: a JITFunction (see ``_InterpretedJIT``)."""
    return _jit_twins()[id(kernel)] if INTERPRETING else kernel


def _launch(kernel, grid, args, flags: dict, config: triton.Config) -> None:
    """One launch of ``kernel`` over ``grid`` with ``config`` (its block sizes, warps and
    stages; num_ctas and the rest stay at triton's defaults, as torch's tracer requires)."""
    if tracing():
        kernel = torch.library.wrap_triton(traceable(kernel))
    kernel[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                 num_stages=config.num_stages)


def _index_table(kind: str, in_size: int, out_size: int, scale: float | None, mode: str,
                 index_kernel: str, device: torch.device) -> Tensor:
    """``indexing.index_table_tensor``; while traced, the same values as a new tensor (a graph
    constant), since a cached real tensor cannot enter a graph traced with fake tensors."""
    if not tracing():
        return index_table_tensor(kind, in_size, out_size, scale, mode, index_kernel, device)
    values = index_table(kind, in_size, out_size, scale, mode, index_kernel)
    return torch.tensor(values.tolist(), dtype=torch.int32, device=device)


class NearestIndex:
    """How the kernels find source pixels for one call: the float32 scales of ATen's CUDA
    formula (``index_kernel == "cuda"``), and for ATen's CPU index kernels the host's tables of
    ``kind`` ("source" or "ranges") on the tensors' device, from fpn_kernels.indexing."""

    def __init__(self, kind: str, top_hw: Sequence[int], out_hw: Sequence[int],
                 scale_factor: Sequence[float] | None, mode: str, index_kernel: str,
                 device: torch.device):
        scales = _axis_scales(scale_factor)
        axes = list(zip((int(s) for s in top_hw), (int(s) for s in out_hw), scales,
                        strict=True))
        self.exact = mode == "nearest-exact"
        self.from_tables = index_kernel != "cuda"
        # float32 values as Python floats: the kernels' fp32 arguments get the same bits.
        self.scales = tuple(float(nearest_scale(i, o, s)) for i, o, s in axes)
        self.tables = None
        if self.from_tables:
            self.tables = tuple(_index_table(kind, i, o, s, mode, index_kernel, device)
                                for i, o, s in axes)

    def pointers(self, unused: Tensor) -> tuple[Tensor, ...]:
        """The two table arguments (``unused`` where the kernel computes the index)."""
        return self.tables if self.tables is not None else (unused, unused)


# --------------------------------------------------------------------------- 1x1 conv (+ epilogue)


def forward_config(c_out: int, pixels: int, n: int, element_size: int, channels_last: bool,
                   tensor_cores: bool = True) -> tuple[int, triton.Config]:
    """The forward's config (index into the list, config), from the shape: the largest tile
    that still launches MIN_PROGRAMS programs (else the smallest), among those allowed for the
    layout, PIXEL_ALIGN and multiply (``kernels.forward_config_allowed``; ``tensor_cores``:
    DOT_TF32). No timing, so no tuning ever runs."""
    if INTERPRETING:
        return -1, kernels.UPSAMPLE_ADD_CONV1X1_INTERPRET_CONFIG
    align = pixel_align(pixels, channels_last)
    allowed = [(i, c) for i, c in enumerate(kernels.UPSAMPLE_ADD_CONV1X1_CONFIGS[element_size])
               if kernels.forward_config_allowed(element_size, i, channels_last, align,
                                                 tensor_cores)]

    def fits(meta: dict) -> bool:
        tiles = triton.cdiv(c_out, meta["BLOCK_CO"]) * triton.cdiv(pixels, meta["BLOCK_P"])
        return tiles * n >= MIN_PROGRAMS

    return _pick(allowed, fits)


def _conv1x1(
    lateral: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    top: Tensor | None,
    index: NearestIndex | None,
    channels_last: bool,
) -> Tensor:
    """``weight @ lateral (+ bias) (+ top[nearest source])`` per image, one launch."""
    n, c_in, height, width = lateral.shape
    c_out = weight.shape[0]
    pixels = height * width
    out = torch.empty((n, c_out, height, width), device=lateral.device, dtype=lateral.dtype,
                      memory_format=_memory_format(channels_last))
    top_h, top_w = top.shape[2:] if top is not None else (0, 0)
    src_row, src_col = index.pointers(out) if index is not None else (out, out)
    scale_h, scale_w = index.scales if index is not None else (1.0, 1.0)
    dot = _dot_flags(lateral)
    _, config = forward_config(c_out, pixels, n, lateral.element_size(), channels_last,
                               dot["DOT_TF32"])
    meta = config.kwargs
    tiles = triton.cdiv(c_out, meta["BLOCK_CO"]) * triton.cdiv(pixels, meta["BLOCK_P"])
    args = (
        lateral, weight, bias if bias is not None else out, top if top is not None else out,
        src_row, src_col, out, c_in, c_out, pixels, width, top_h, top_w, scale_h, scale_w, tiles,
    )
    flags = dict(
        HAS_BIAS=bias is not None,
        HAS_TOP=top is not None,
        CHANNELS_LAST=channels_last,
        INT64_INDEX=_int64_index(lateral[0].numel(), out[0].numel(),
                                 top[0].numel() if top is not None else 0),
        PIXEL_ALIGN=pixel_align(pixels, channels_last),
        INDEX_TABLES=index is not None and index.from_tables,
        EXACT=index is not None and index.exact,
        **dot,
    )
    _launch(kernels.upsample_add_conv1x1_kernel, (tiles * n,), args, flags, config)
    return out


# --------------------------------------------------------------------------- grad_weight, grad_bias


def _weight_grad_config(c_out: int, c_in: int, element_size: int) -> triton.Config:
    """The largest tile that is at least half filled along both channel axes."""
    if INTERPRETING:
        return kernels.CONV1X1_WEIGHT_GRAD_INTERPRET_CONFIG

    def fits(meta: dict) -> bool:
        return all(triton.cdiv(c, block) * block <= 2 * c
                   for c, block in ((c_out, meta["BLOCK_CO"]), (c_in, meta["BLOCK_CI"])))

    return _pick(list(enumerate(kernels.CONV1X1_WEIGHT_GRAD_CONFIGS[element_size])), fits)[1]


def weight_grad_split(n: int, pixels: int, tiles: int, block_k: int) -> tuple[int, int]:
    """(chunk_pixels, chunks_per_image) of the grad_weight reduction: the largest chunk that
    still gives MIN_PROGRAMS programs, at least 8 pixel steps per program. A function of the
    shape and config only, hence deterministic."""
    chunk = max(8 * block_k, n * pixels * tiles // MIN_PROGRAMS)
    chunk = min(triton.cdiv(chunk, block_k) * block_k, triton.cdiv(pixels, block_k) * block_k)
    return chunk, triton.cdiv(pixels, chunk)


def _ordered_sum(partial: Tensor, out: Tensor, tail: Tensor | None) -> None:
    """partial.sum(0) in split order (fp32), cast: the first out.numel() elements to out, the
    rest to tail (one launch for grad_weight and grad_bias)."""
    numel = partial.shape[1]
    config = (kernels.ORDERED_SUM_INTERPRET_CONFIG if INTERPRETING
              else kernels.ORDERED_SUM_CONFIGS[0])
    grid = (triton.cdiv(numel, config.kwargs["BLOCK"]),)
    # Without a tail no element goes there, but the pointer must not be ``out``: traced as
    # triton_kernel_wrapper_functional, both written pointers get an output of their own, and
    # the (untouched) tail's would replace ``out``.
    args = (partial, out, tail if tail is not None else out.new_empty((1,)), partial.shape[0],
            numel, out.numel())
    _launch(kernels.ordered_sum_kernel, grid, args, {}, config)


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
    # One fp32 row per split: grad_weight's partial sum, then grad_bias's.
    partial = torch.empty((splits, c_out * c_in + (c_out if need_bias else 0)),
                          device=lateral.device, dtype=torch.float32)
    flags = dict(
        HAS_BIAS=need_bias,
        CHANNELS_LAST=channels_last,
        INT64_INDEX=_int64_index(lateral[0].numel(), grad_out[0].numel()),
        PIXEL_ALIGN=pixel_align(pixels, channels_last),
        **_dot_flags(lateral),
    )
    args = (grad_out, lateral, partial, c_in, c_out, pixels, chunk, chunks_per_image)
    _launch(kernels.conv1x1_weight_grad_kernel, (splits, tiles), args, flags, config)
    grad_weight = torch.empty((c_out, c_in), device=lateral.device, dtype=lateral.dtype)
    grad_bias = (torch.empty((c_out,), device=lateral.device, dtype=lateral.dtype)
                 if need_bias else None)
    _ordered_sum(partial, grad_weight, grad_bias)
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
    index = NearestIndex("ranges", (top_h, top_w), (height, width), scale_factor, mode,
                         index_kernel, grad_out.device)
    max_rows = _longest_range(top_h, height, scale_h, mode, index_kernel)
    max_cols = _longest_range(top_w, width, scale_w, mode, index_kernel)
    grad_top = torch.empty((n, c_out, top_h, top_w), device=grad_out.device, dtype=grad_out.dtype,
                           memory_format=_memory_format(channels_last))
    config = (kernels.NEAREST_UPSAMPLE_GRAD_INTERPRET_CONFIG if INTERPRETING
              else kernels.NEAREST_UPSAMPLE_GRAD_CONFIGS[grad_out.element_size()][0])
    meta = config.kwargs
    tiles = triton.cdiv(c_out, meta["BLOCK_C"]) * triton.cdiv(top_h * top_w, meta["BLOCK_T"])
    args = (grad_out, *index.pointers(grad_top), grad_top, c_out, height, width, top_h, top_w,
            max_rows, max_cols, *index.scales, height.bit_length(), width.bit_length(), tiles)
    flags = dict(CHANNELS_LAST=channels_last,
                 INT64_INDEX=_int64_index(grad_out[0].numel(), grad_top[0].numel()),
                 INDEX_TABLES=index.from_tables, EXACT=index.exact)
    _launch(kernels.nearest_upsample_grad_kernel, (tiles * n,), args, flags, config)
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
    # index_kernel: the ATen index computation eager's interpolate runs for the caller's top
    # (it differs by device, and on CPU by layout and size); its math is fpn_kernels.indexing.
    index = NearestIndex("source", top.shape[2:], lateral.shape[2:], scale_factor, mode,
                         index_kernel, lateral.device)
    return _conv1x1(lateral, weight, bias, top, index, channels_last)


def backward(grad_out: Tensor, lateral: Tensor, weight: Tensor, top_hw: Sequence[int], mode: str,
             scale_factor: Sequence[float] | None, channels_last: bool, index_kernel: str,
             needs: Sequence[bool]):
    if _degenerate(grad_out, lateral, weight):
        return _eager_backend.backward(grad_out, lateral, weight, top_hw, mode, scale_factor,
                                       channels_last, index_kernel, needs)
    need_lateral, need_weight, need_bias, need_top = (bool(x) for x in needs)
    grad_lateral = grad_weight = grad_bias = grad_top = None
    if need_lateral:  # grad_lateral = weight^T @ grad_out: the forward kernel, no epilogue
        grad_lateral = _conv1x1(grad_out, weight.t().contiguous(), None, None, None,
                                channels_last)
    if need_weight or need_bias:
        grad_weight, grad_bias = _weight_and_bias_grad(grad_out, lateral, channels_last,
                                                       need_bias)
    if need_top:
        grad_top = _upsample_grad(grad_out, top_hw, mode, scale_factor, channels_last,
                                  index_kernel)
    return grad_lateral, grad_weight if need_weight else None, grad_bias, grad_top
