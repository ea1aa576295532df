"""Triton kernels of the FPN merge, each with its curated configs beside it.

Layouts. An image of ``C`` channels and ``P = H * W`` pixels is a (C, P) row-major matrix in
NCHW and a (P, C) row-major matrix in channels_last; ``_offsets`` turns (channel, pixel) index
tiles into element offsets for either, with the stride-1 axis a literal 1 so the compiler sees
which axis is contiguous and vectorizes along it.

Kernels (all accumulate in fp32; all are deterministic: every output element is summed by one
program in a fixed order, no atomics):

* ``upsample_add_conv1x1_kernel``: ``out = weight @ lateral (+ bias) (+ top[nearest])``. The
  forward, and with ``weight^T`` and no epilogue also grad_lateral.
* ``conv1x1_weight_grad_kernel``: per fixed pixel chunk ``s``, one fp32 row ``partial[s] =
  (grad_out @ lateral^T, rowsum(grad_out))``.
* ``ordered_sum_kernel``: ``partial[0] + partial[1] + ...`` in that order, split into
  grad_weight and grad_bias: one launch.
* ``nearest_upsample_grad_kernel``: grad_top, each top pixel sums its destination rectangle.

Configs: ``*_CONFIGS[element_size]`` lists the GPU configs per operand element size (2: fp16 and
bf16, 4: fp32), ordered from the largest tile to the smallest; ``*_INTERPRET_CONFIG`` is the one
config used under ``TRITON_INTERPRET=1`` (small tiles, so one test shape crosses several tiles in
every dimension and the masks are exercised).
"""

from __future__ import annotations

import triton
import triton.language as tl

# --------------------------------------------------------------------------- shared helpers


@triton.jit
def _offsets(channel, pixel, C, P, CHANNELS_LAST: tl.constexpr):
    """Element offset of (channel, pixel) inside one image of C channels and P pixels."""
    if CHANNELS_LAST:
        offset = pixel * C + channel * 1
    else:
        offset = channel * P + pixel * 1
    return offset


@triton.jit
def _pixel_stride(C, CHANNELS_LAST: tl.constexpr):
    """Elements between neighbouring pixels of one channel."""
    if CHANNELS_LAST:
        stride = C
    else:
        stride = 1
    return stride


@triton.jit
def _to_tile(channel, pixel, CHANNELS_LAST: tl.constexpr):
    """Broadcast 1-D channel and pixel vectors to the 2-D output tile, whose contiguous axis is
    the memory's: (channels, pixels) for NCHW, (pixels, channels) for channels_last."""
    if CHANNELS_LAST:
        channel_2d = channel[None, :]
        pixel_2d = pixel[:, None]
    else:
        channel_2d = channel[:, None]
        pixel_2d = pixel[None, :]
    return channel_2d, pixel_2d


@triton.jit
def _zeros_tile(BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """An fp32 accumulator shaped like the tiles of ``_to_tile``."""
    if CHANNELS_LAST:
        tile = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    else:
        tile = tl.zeros((BLOCK_C, BLOCK_P), dtype=tl.float32)
    return tile


@triton.jit
def _mma(a, b, acc, DOT_TF32: tl.constexpr, DOT_IN_FP32: tl.constexpr):
    """acc + a @ b: tensor-core MMA for 16-bit tiles and, with DOT_TF32, for fp32 as TF32;
    IEEE fp32 (FMA) otherwise. A bool, not the precision string: torch's trace of a
    wrap_triton launch (its TTIR mutation analysis) cannot specialize a str argument.
    DOT_IN_FP32 upcasts the tiles first, for the interpreter only: its dot multiplies bfloat16
    bit patterns as integers (triton 3.8), fp32 tiles it gets right."""
    if DOT_IN_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif DOT_TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _nearest_source(dst, scale, in_size, EXACT: tl.constexpr):
    """ATen's CUDA nearest index (``fpn_kernels.indexing``, index kernel "cuda"): float32
    ``floorf(dst * scale)``, "nearest-exact" ``floorf((dst + 0.5f) * scale)``, at most
    in_size - 1. ``scale`` is the host's float32 ``indexing.nearest_scale``."""
    pos = dst.to(tl.float32)
    if EXACT:
        pos = pos + 0.5
    src = tl.floor(pos * scale).to(tl.int32)
    return tl.minimum(src, in_size - 1)


@triton.jit
def _first_destination(src, scale, in_size, out_size, search_steps, EXACT: tl.constexpr):
    """The adjoint of ``_nearest_source``: the first destination reading source ``src`` (or
    out_size), by binary search over the non-decreasing map, like ``indexing.destination_ranges``
    and nearest_index.h's first_destination. search_steps: out_size.bit_length()."""
    lo = tl.zeros_like(src)
    hi = lo + out_size
    for _ in range(0, search_steps):
        active = lo < hi
        mid = lo + (hi - lo) // 2
        below = _nearest_source(mid, scale, in_size, EXACT) < src
        lo = tl.where(active & below, mid + 1, lo)
        hi = tl.where(active & (below == 0), mid, hi)
    return lo


# --------------------------------------------------------------------------- forward

# (BLOCK_CO, BLOCK_P, BLOCK_K, warps, stages), from the largest tile to the smallest; launch.py
# picks the largest that still launches MIN_PROGRAMS programs (a rule on the shape, no timing).
# C_out is 256 in every FPN, so 128-row channel tiles make two programs per pixel tile; both are
# launched next to each other, so the lateral tile comes from HBM once and from L2 the second
# time. fp32 takes BLOCK_K = 16: with 32 the IEEE (FMA) dot spills on sm_80; TF32 loses nothing
# by it, as the kernel is bound by memory.
#
# Occupancy (sm_90: 65536 registers, 228 KiB shared memory per SM, 1 KiB of it reserved per
# block; registers go to warps in units of 256, so a thread's count rounds up to 8). Two
# resident blocks (CTAs) need registers x threads <= 32768 each (at most 128 registers a thread
# with 8 warps, 255 with 4) and at most 113 KiB of shared memory each (stages x (BLOCK_CO +
# BLOCK_P) x BLOCK_K x element size on sm_90). Forward, triton 3.8, 32-bit offsets: registers a
# thread over the PIXEL_ALIGN / layout / flag variants tests/test_triton_aot.py compiles,
# shared memory per block, blocks per SM, on sm_90 | sm_80:
#   16-bit 0  128x128x64, 8 warps, 3 stages: 158-255 regs, 96 KiB, 1 | 173-255, 64 KiB, 1.
#             Holding the top gather across the loop costs the second block here (the same
#             tile without the epilogue, grad_lateral, takes 104-145 regs: 1-2 blocks).
#   16-bit 1  128x64x64, 8 warps, 3 stages: 105-126 regs, 72 KiB, 2 | 127-178, 48 KiB, 1-2.
#   16-bit 2  64x128x64, 8 warps, 3 stages: 108-128 regs, 72 KiB, 2 | 128-204, 48 KiB, 1-2.
#   fp32   0  128x128x16, 8 warps, 4 stages: 144-254 regs, 64 KiB, 1 | 156-255, 48 KiB, 1.
#   fp32   1  128x64x16, 8 warps, 3 stages: 124-130 regs, 36 KiB, 1-2 (TF32 NCHW at
#             PIXEL_ALIGN 4 and 8 takes 130: 1 block) | 118-141, 32 KiB, 1-2.
#   fp32   2  64x128x16, 8 warps, 4 stages: 76-128 regs, 48 KiB, 2 | 112-139, 36 KiB, 1-2.
# UPSAMPLE_ADD_CONV1X1_TWO_BLOCKS names the configs that keep 2 blocks per SM on sm_90 in every
# compiled 32-bit-offset specialization; tests/test_triton_aot.py asserts it for each of their
# forward and grad_lateral compiles. Tried and left out (tests/test_triton_aot.py's variants):
# every BLOCK_P = 256 tile (128x256 spills at 8 warps; 64x256 spills at 4 warps and holds 1
# block at 8), BLOCK_K = 128 with 2 stages (128x64 at 8 warps: 162 regs, 1 block; 64x128 at 4
# warps spills on sm_80; 128x128 at 8 warps: 128 KiB, 1 block), and every 4-warp tile of
# 8192 outputs (128x64, 64x128: they spill at PIXEL_ALIGN 1 or 2, where each element of the
# NCHW tiles is its own load; the 64x128 4-warp config shipped before did too).
# 128x128 (config 0) spills with NCHW at PIXEL_ALIGN 1 (an odd pixel count: each element of
# the tiles is its own load; triton 3.8: 8 B of stack for 16-bit on sm_90, 40-200 B with 64-bit
# offsets for every dtype; none at PIXEL_ALIGN 2), so such rows never use it:
# ``forward_config_allowed``, which launch.py picks by and the AOT test compiles by.
UPSAMPLE_ADD_CONV1X1_CONFIGS = {
    2: [
        triton.Config({"BLOCK_CO": 128, "BLOCK_P": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_CO": 128, "BLOCK_P": 64, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_CO": 64, "BLOCK_P": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    ],
    4: [
        triton.Config({"BLOCK_CO": 128, "BLOCK_P": 128, "BLOCK_K": 16}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_CO": 128, "BLOCK_P": 64, "BLOCK_K": 16}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_CO": 64, "BLOCK_P": 128, "BLOCK_K": 16}, num_warps=8, num_stages=4),
    ],
}
# Indices into UPSAMPLE_ADD_CONV1X1_CONFIGS[element_size] of the 2-blocks-per-SM (sm_90) configs.
UPSAMPLE_ADD_CONV1X1_TWO_BLOCKS = {2: (1, 2), 4: (2,)}
# The least PIXEL_ALIGN an NCHW launch needs to use a config (by index; absent: any).
UPSAMPLE_ADD_CONV1X1_NCHW_MIN_PIXEL_ALIGN = {2: {0: 2}, 4: {0: 2}}
# The configs fp32 as IEEE (CUDA-core FMA, no tensor cores) may use: its operand tiles sit in
# registers beside the accumulator, so the 8192- and 16384-output tiles spill (triton 3.6 on
# sm_80: 128x128 48-112 B at every layout, 128x64 4 B at NCHW PIXEL_ALIGN 8).
UPSAMPLE_ADD_CONV1X1_FMA_CONFIGS = (2,)


def forward_config_allowed(element_size: int, config_index: int, channels_last: bool,
                           pixel_align: int, tensor_cores: bool) -> bool:
    """Whether the forward kernel (and grad_lateral, the same kernel) may run config
    ``config_index`` of ``UPSAMPLE_ADD_CONV1X1_CONFIGS[element_size]`` for this layout,
    PIXEL_ALIGN and multiply (``tensor_cores``: 16-bit or TF32, i.e. DOT_TF32; else IEEE fp32
    on FMA units): everything but the tiles that spill there."""
    if not tensor_cores and config_index not in UPSAMPLE_ADD_CONV1X1_FMA_CONFIGS:
        return False
    least = UPSAMPLE_ADD_CONV1X1_NCHW_MIN_PIXEL_ALIGN[element_size].get(config_index, 1)
    return channels_last or pixel_align >= least


UPSAMPLE_ADD_CONV1X1_INTERPRET_CONFIG = triton.Config(
    {"BLOCK_CO": 16, "BLOCK_P": 128, "BLOCK_K": 16}, num_warps=4, num_stages=1
)


@triton.jit(do_not_specialize=["P", "W", "h", "w", "scale_h", "scale_w", "tiles_per_image"])
def upsample_add_conv1x1_kernel(
    lateral_ptr, weight_ptr, bias_ptr, top_ptr, src_row_ptr, src_col_ptr, out_ptr,
    C_in, C_out, P, W, h, w, scale_h, scale_w, tiles_per_image,
    HAS_BIAS: tl.constexpr, HAS_TOP: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    DOT_TF32: tl.constexpr, DOT_IN_FP32: tl.constexpr, INT64_INDEX: tl.constexpr,
    PIXEL_ALIGN: tl.constexpr, INDEX_TABLES: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n] (C_out, P) = weight (C_out, C_in) @ lateral[n] (C_in, P) + bias[:, None]
    + top[n] (C_out, h*w)[:, src_row[y] * w + src_col[x]], with pixel p = y * W + x, P = H * W.

    Grid: (tiles_per_image * N,), tiles_per_image = cdiv(C_out, BLOCK_CO) * cdiv(P, BLOCK_P):
    one axis, so any batch size fits. NCHW computes the tile as weight @ lateral
    (C_out x pixels), channels_last as lateral @ weight^T (pixels x C_out), so both operands are
    read along their contiguous axis. PIXEL_ALIGN: a power of two dividing P (at most 16), so
    NCHW rows are known to be aligned and load as vectors; the sizes themselves are not
    specialized (do_not_specialize), so a new image size compiles nothing.
    Source pixels: INDEX_TABLES reads the host's tables src_row/src_col (ATen's CPU index
    kernels, interpreter only); else ``_nearest_source`` with the float32 scales (ATen's CUDA
    kernel): no table, so no host-to-device copy per shape.
    """
    # --- which tile: channel tiles of one pixel tile are neighbours (they share lateral)
    pid = tl.program_id(0)
    image = (pid // tiles_per_image).to(tl.int64)
    pid = pid % tiles_per_image
    num_co_tiles = tl.cdiv(C_out, BLOCK_CO)
    co_tile = pid % num_co_tiles
    p_tile = pid // num_co_tiles
    P = (P // PIXEL_ALIGN) * PIXEL_ALIGN  # = P; says P % PIXEL_ALIGN == 0 to the compiler
    offs_co = co_tile * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_p = p_tile * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_k = tl.arange(0, BLOCK_K)
    co_in = offs_co < C_out
    p_in = offs_p < P
    if HAS_TOP:  # the source pixels (int32: widened below, before scaling by C_out)
        if INDEX_TABLES:
            src_row = tl.load(src_row_ptr + offs_p // W, mask=p_in, other=0)
            src_col = tl.load(src_col_ptr + offs_p % W, mask=p_in, other=0)
        else:
            src_row = _nearest_source(offs_p // W, scale_h, h, EXACT)
            src_col = _nearest_source(offs_p % W, scale_w, w, EXACT)
        src_pixel = src_row * w + src_col
    if INT64_INDEX:  # one image holds 2^31 elements or more
        offs_co = offs_co.to(tl.int64)
        offs_p = offs_p.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        P = P.to(tl.int64)
        if HAS_TOP:
            src_pixel = src_pixel.to(tl.int64)
    lateral_ptr += image * C_in * P
    out_ptr += image * C_out * P

    # --- the epilogue's operands first, into registers: the index tables (or index math), the
    # bias and, on the tensor-core path (DOT_TF32: 16-bit and TF32), the top gather are issued
    # before the main loop, so their latency hides behind the GEMM instead of following it.
    # top is gathered after the loop for IEEE fp32 (FMA), where the fp32 tile held across the
    # loop (64 registers a thread at 128 x 128 and 8 warps) makes it spill, and for NCHW with
    # PIXEL_ALIGN 1 or 2, where the operand tiles load element by element and need the
    # registers. Only the loads move: the adds below keep their order, so every path gives the
    # same bits.
    channel, pixel = _to_tile(offs_co, offs_p, CHANNELS_LAST)
    co_in_2d, p_in_2d = _to_tile(co_in, p_in, CHANNELS_LAST)
    mask = co_in_2d & p_in_2d
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_co, mask=co_in, other=0.0).to(tl.float32)
        bias_2d, _ = _to_tile(bias, offs_p, CHANNELS_LAST)
    if HAS_TOP:
        _, src_pixel_2d = _to_tile(offs_co, src_pixel, CHANNELS_LAST)
        top_ptrs = top_ptr + image * C_out * h * w + _offsets(channel, src_pixel_2d, C_out,
                                                              h * w, CHANNELS_LAST)
        if DOT_TF32 and (CHANNELS_LAST or PIXEL_ALIGN >= 4):
            top_tile = tl.load(top_ptrs, mask=mask, other=0.0)

    # --- main loop over C_in: fp32 accumulator, operand tiles in the input dtype
    weight_ptrs = weight_ptr + offs_co[:, None] * C_in + offs_k[None, :]  # [BLOCK_CO, BLOCK_K]
    channel_k, pixel_k = _to_tile(offs_k, offs_p, CHANNELS_LAST)
    lateral_ptrs = lateral_ptr + _offsets(channel_k, pixel_k, C_in, P, CHANNELS_LAST)
    lateral_k_step = BLOCK_K * P
    if CHANNELS_LAST:
        lateral_k_step = BLOCK_K
    acc = _zeros_tile(BLOCK_CO, BLOCK_P, CHANNELS_LAST)
    for k in range(0, C_in, BLOCK_K):
        weight_tile = tl.load(weight_ptrs, mask=co_in[:, None] & (offs_k[None, :] < C_in - k),
                              other=0.0)
        lateral_tile = tl.load(lateral_ptrs, mask=(channel_k < C_in - k) & (pixel_k < P),
                               other=0.0)
        if CHANNELS_LAST:  # [BLOCK_P, BLOCK_K] @ [BLOCK_K, BLOCK_CO]
            acc = _mma(lateral_tile, tl.trans(weight_tile), acc, DOT_TF32, DOT_IN_FP32)
        else:  # [BLOCK_CO, BLOCK_K] @ [BLOCK_K, BLOCK_P]
            acc = _mma(weight_tile, lateral_tile, acc, DOT_TF32, DOT_IN_FP32)
        weight_ptrs += BLOCK_K
        lateral_ptrs += lateral_k_step

    # --- epilogue in registers: + bias + top[nearest source], one rounding, one store
    if HAS_BIAS:
        acc += bias_2d
    if HAS_TOP:
        if not (DOT_TF32 and (CHANNELS_LAST or PIXEL_ALIGN >= 4)):
            top_tile = tl.load(top_ptrs, mask=mask, other=0.0)
        acc += top_tile.to(tl.float32)
    out_ptrs = out_ptr + _offsets(channel, pixel, C_out, P, CHANNELS_LAST)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------- grad_weight, grad_bias

# (BLOCK_CO, BLOCK_CI, BLOCK_K = pixels per step, warps, stages), BLOCK_K = 16 for fp32 as
# above. The pixel chunk per program is chosen on the host from the shape alone (launch.py),
# never from timing. The 128 x 128 16-bit tile steps 32 pixels over 4 stages: with 64 pixels
# over 3, triton 3.6's bf16 NCHW build for sm_80 needs an 8-byte stack frame at 128 registers.
# The 64 x 64 16-bit tile runs 8 warps (triton 3.8, every launchable variant: 78-192 registers
# on sm_80, 43-192 on sm_90, no spill): with 4 warps it spilled 64-128 B with NCHW at
# PIXEL_ALIGN 1, where each element is its own load, and stepping 32 pixels instead left an
# 8-byte stack frame on sm_80 (PIXEL_ALIGN 4, 64-bit offsets, no bias).
CONV1X1_WEIGHT_GRAD_CONFIGS = {
    2: [
        triton.Config({"BLOCK_CO": 128, "BLOCK_CI": 128, "BLOCK_K": 32}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 64, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    ],
    4: [
        triton.Config({"BLOCK_CO": 128, "BLOCK_CI": 128, "BLOCK_K": 16}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_CO": 64, "BLOCK_CI": 64, "BLOCK_K": 16}, num_warps=8, num_stages=4),
    ],
}
CONV1X1_WEIGHT_GRAD_INTERPRET_CONFIG = triton.Config(
    {"BLOCK_CO": 16, "BLOCK_CI": 16, "BLOCK_K": 64}, num_warps=4, num_stages=1
)


@triton.jit(do_not_specialize=["P", "chunks_per_image"])  # chunk: a multiple of 16
def conv1x1_weight_grad_kernel(
    grad_out_ptr, lateral_ptr, partial_ptr,
    C_in, C_out, P, chunk_pixels, chunks_per_image,
    HAS_BIAS: tl.constexpr, CHANNELS_LAST: tl.constexpr,
    DOT_TF32: tl.constexpr, DOT_IN_FP32: tl.constexpr, INT64_INDEX: tl.constexpr,
    PIXEL_ALIGN: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial[s, :C_out*C_in] (C_out, C_in) = grad_out[n] (C_out, chunk) @ lateral[n]^T
    (chunk, C_in) and, with HAS_BIAS, partial[s, C_out*C_in:] (C_out,) = grad_out[n]
    (C_out, chunk) summed over the chunk, where split s = n * chunks_per_image + c covers pixels
    [c * chunk_pixels, (c + 1) * chunk_pixels). partial: (splits, C_out*C_in (+ C_out)) fp32,
    one row per split, so one ``ordered_sum_kernel`` launch reduces both gradients.

    Grid: (N * chunks_per_image, cdiv(C_out, BLOCK_CO) * cdiv(C_in, BLOCK_CI)): splits on the
    first axis, so any batch size fits. PIXEL_ALIGN as in ``upsample_add_conv1x1_kernel``;
    chunk_pixels is a multiple of BLOCK_K. The split is fixed by the shape, so the ordered sum
    over s gives the same bits on every run. The bias part is written by the programs of the
    first C_in tile.
    """
    # --- which tile, which pixel chunk
    split = tl.program_id(0)
    pid = tl.program_id(1)
    num_co_tiles = tl.cdiv(C_out, BLOCK_CO)
    co_tile = pid % num_co_tiles
    ci_tile = pid // num_co_tiles
    # Exact rewrites (the host guarantees both divisions) that tell the compiler the alignment:
    # tl.multiple_of on a kernel argument is lost.
    P = (P // PIXEL_ALIGN) * PIXEL_ALIGN
    chunk_pixels = (chunk_pixels // BLOCK_K) * BLOCK_K
    image = (split // chunks_per_image).to(tl.int64)
    p_begin = (split % chunks_per_image) * chunk_pixels
    p_end = tl.minimum(p_begin + chunk_pixels, P)
    offs_co = co_tile * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = ci_tile * BLOCK_CI + tl.arange(0, BLOCK_CI)
    offs_k = tl.arange(0, BLOCK_K)
    if INT64_INDEX:
        offs_co = offs_co.to(tl.int64)
        offs_ci = offs_ci.to(tl.int64)
        offs_k = offs_k.to(tl.int64)
        P = P.to(tl.int64)
    co_in = offs_co < C_out
    ci_in = offs_ci < C_in
    grad_out_ptr += image * C_out * P
    lateral_ptr += image * C_in * P

    # --- reduction over the chunk's pixels, in order
    offs_p = p_begin + offs_k
    grad_out_ptrs = grad_out_ptr + _offsets(offs_co[:, None], offs_p[None, :], C_out, P,
                                            CHANNELS_LAST)  # [BLOCK_CO, BLOCK_K]
    lateral_ptrs = lateral_ptr + _offsets(offs_ci[None, :], offs_p[:, None], C_in, P,
                                          CHANNELS_LAST)  # [BLOCK_K, BLOCK_CI]
    grad_out_p_step = BLOCK_K * _pixel_stride(C_out, CHANNELS_LAST)
    lateral_p_step = BLOCK_K * _pixel_stride(C_in, CHANNELS_LAST)
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_CO,), dtype=tl.float32)
    for p in range(p_begin, p_end, BLOCK_K):
        p_in = offs_k < p_end - p
        grad_out_tile = tl.load(grad_out_ptrs, mask=co_in[:, None] & p_in[None, :], other=0.0)
        lateral_tile = tl.load(lateral_ptrs, mask=p_in[:, None] & ci_in[None, :], other=0.0)
        acc = _mma(grad_out_tile, lateral_tile, acc, DOT_TF32, DOT_IN_FP32)
        if HAS_BIAS:
            bias_acc += tl.sum(grad_out_tile.to(tl.float32), axis=1)
        grad_out_ptrs += grad_out_p_step
        lateral_ptrs += lateral_p_step

    # --- this split's partial sums (fp32), one row of partial
    row_numel = C_out * C_in
    if HAS_BIAS:
        row_numel += C_out
    partial_ptr += split.to(tl.int64) * row_numel
    tl.store(partial_ptr + offs_co[:, None] * C_in + offs_ci[None, :], acc,
             mask=co_in[:, None] & ci_in[None, :])
    if HAS_BIAS:
        tl.store(partial_ptr + C_out * C_in + offs_co, bias_acc, mask=co_in & (ci_tile == 0))


ORDERED_SUM_CONFIGS = [triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1)]
ORDERED_SUM_INTERPRET_CONFIG = triton.Config({"BLOCK": 256}, num_warps=4, num_stages=1)


@triton.jit(do_not_specialize=["num_splits"])
def ordered_sum_kernel(partial_ptr, out_ptr, tail_ptr, num_splits, numel, out_numel,
                       BLOCK: tl.constexpr):
    """sum = partial[0] + partial[1] + ... + partial[num_splits - 1] (numel,), summed in that
    order in fp32, then cast: elements [0, out_numel) to out, the rest to tail (grad_weight and
    grad_bias from one launch). partial: (num_splits, numel) fp32.

    The loop loads four rows before adding them in row order: the same adds as one row at a
    time (the same bits), with four loads in flight instead of one.
    Grid: (cdiv(numel, BLOCK),).
    """
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    partial_ptrs = partial_ptr + offs
    pipelined = num_splits - num_splits % 4
    for _ in range(0, pipelined, 4):
        row0 = tl.load(partial_ptrs, mask=mask, other=0.0)
        row1 = tl.load(partial_ptrs + numel, mask=mask, other=0.0)
        row2 = tl.load(partial_ptrs + 2 * numel, mask=mask, other=0.0)
        row3 = tl.load(partial_ptrs + 3 * numel, mask=mask, other=0.0)
        acc = (((acc + row0) + row1) + row2) + row3
        partial_ptrs += 4 * numel
    for _ in range(pipelined, num_splits):
        acc += tl.load(partial_ptrs, mask=mask, other=0.0)
        partial_ptrs += numel
    value = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, value, mask=offs < out_numel)
    tl.store(tail_ptr + (offs - out_numel), value, mask=mask & (offs >= out_numel))


# --------------------------------------------------------------------------- grad_top

# (BLOCK_C, BLOCK_T = top pixels, warps, stages): no tensor cores, a gather-sum; 4096-element
# tiles keep enough loads in flight per program. 8 warps: with 4, the in-kernel range search
# (_first_destination) needs a stack frame at 168 registers.
NEAREST_UPSAMPLE_GRAD_CONFIGS = {
    2: [triton.Config({"BLOCK_C": 64, "BLOCK_T": 64}, num_warps=8, num_stages=1)],
    4: [triton.Config({"BLOCK_C": 64, "BLOCK_T": 64}, num_warps=8, num_stages=1)],
}
NEAREST_UPSAMPLE_GRAD_INTERPRET_CONFIG = triton.Config(
    {"BLOCK_C": 16, "BLOCK_T": 128}, num_warps=4, num_stages=1
)


@triton.jit(do_not_specialize=["H", "W", "h", "w", "max_rows", "max_cols", "scale_h",
                                 "scale_w", "row_steps", "col_steps", "tiles_per_image"])
def nearest_upsample_grad_kernel(
    grad_out_ptr, row_begin_ptr, col_begin_ptr, grad_top_ptr,
    C, H, W, h, w, max_rows, max_cols, scale_h, scale_w, row_steps, col_steps, tiles_per_image,
    CHANNELS_LAST: tl.constexpr, INT64_INDEX: tl.constexpr, INDEX_TABLES: tl.constexpr,
    EXACT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """grad_top[n, c, ty, tx] = sum of grad_out[n, c, y, x] over y in [row_begin[ty],
    row_begin[ty + 1]) and x in [col_begin[tx], col_begin[tx + 1]), row by row: the exact adjoint
    of the forward's nearest gather (every destination pixel has one source, so these
    rectangles tile the output). max_rows/max_cols: the longest range on each axis.
    INDEX_TABLES reads row_begin/col_begin from the host (ATen's CPU index kernels, interpreter
    only); else ``_first_destination`` computes them from the float32 scales (row_steps,
    col_steps: H.bit_length(), W.bit_length()).

    Grid: (tiles_per_image * N,), tiles_per_image = cdiv(C, BLOCK_C) * cdiv(h*w, BLOCK_T).
    """
    # --- which tile of (channels, top pixels)
    pid = tl.program_id(0)
    image = (pid // tiles_per_image).to(tl.int64)
    pid = pid % tiles_per_image
    num_c_tiles = tl.cdiv(C, BLOCK_C)
    c_tile = pid % num_c_tiles
    t_tile = pid // num_c_tiles
    P = H * W
    T = h * w
    offs_c = c_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_t = t_tile * BLOCK_T + tl.arange(0, BLOCK_T)
    if INT64_INDEX:
        offs_c = offs_c.to(tl.int64)
        offs_t = offs_t.to(tl.int64)
        P = P.to(tl.int64)
    c_in = offs_c < C
    t_in = offs_t < T
    grad_out_ptr += image * C * P
    grad_top_ptr += image * C * T

    # --- each top pixel's destination rectangle: first pixel and extent
    top_y = offs_t // w
    top_x = offs_t % w
    if INDEX_TABLES:
        row_first = tl.load(row_begin_ptr + top_y, mask=t_in, other=0)
        row_end = tl.load(row_begin_ptr + top_y + 1, mask=t_in, other=0)
        col_first = tl.load(col_begin_ptr + top_x, mask=t_in, other=0)
        col_end = tl.load(col_begin_ptr + top_x + 1, mask=t_in, other=0)
    else:
        top_y = top_y.to(tl.int32)
        top_x = top_x.to(tl.int32)
        row_first = _first_destination(top_y, scale_h, h, H, row_steps, EXACT)
        row_end = _first_destination(top_y + 1, scale_h, h, H, row_steps, EXACT)
        col_first = _first_destination(top_x, scale_w, w, W, col_steps, EXACT)
        col_end = _first_destination(top_x + 1, scale_w, w, W, col_steps, EXACT)
    num_rows = row_end - row_first
    num_cols = col_end - col_first
    first_pixel = row_first * W + col_first  # int32 tables: widen before scaling by C
    if INT64_INDEX:
        first_pixel = first_pixel.to(tl.int64)
    channel, first_pixel = _to_tile(offs_c, first_pixel, CHANNELS_LAST)
    _, num_rows = _to_tile(offs_c, num_rows, CHANNELS_LAST)
    _, num_cols = _to_tile(offs_c, num_cols, CHANNELS_LAST)
    c_in_2d, t_in_2d = _to_tile(c_in, t_in, CHANNELS_LAST)
    mask = c_in_2d & t_in_2d
    first_ptrs = grad_out_ptr + _offsets(channel, first_pixel, C, P, CHANNELS_LAST)
    pixel_stride = _pixel_stride(C, CHANNELS_LAST)

    # --- fixed-order sum over the rectangle, row by row
    acc = _zeros_tile(BLOCK_C, BLOCK_T, CHANNELS_LAST)
    for dy in range(0, max_rows):
        for dx in range(0, max_cols):
            reads = mask & (dy < num_rows) & (dx < num_cols)
            step = dy * W + dx
            if INT64_INDEX:  # channels_last: step * C can pass 2^31 on a large image
                step = step.to(tl.int64)
            grad = tl.load(first_ptrs + step * pixel_stride, mask=reads, other=0.0)
            acc += grad.to(tl.float32)
    _, top_pixel = _to_tile(offs_c, offs_t, CHANNELS_LAST)
    grad_top_ptrs = grad_top_ptr + _offsets(channel, top_pixel, C, T, CHANNELS_LAST)
    tl.store(grad_top_ptrs, acc.to(grad_top_ptr.dtype.element_ty), mask=mask)
