// Fused CPU kernels: out = conv1x1(lateral, weight) + bias + nearest_upsample(top).
//
// Forward, per task = (image n, tile of ~kTilePixels output pixels, whole rows where they fit):
//   1. the prologue: bias + top[src_row(y), src_col(x)] written into the output tile (float/
//      double) or, for bfloat16/half, into an fp32 tile;
//   2. one GEMM (TileGemm) accumulates weight (C_out, C_in) @ lateral tile (C_in, P) onto it
//      while the tile is hot in L2: at::mm_out on views of the tiles (torch's own BLAS, MKL in
//      the x86 wheels), or for bfloat16 on AMX or AVX512-BF16 CPUs oneDNN's brgemm ukernel on
//      the bf16 tiles (csrc/cpu/bf16_gemm.h). Otherwise half/bfloat16 operands go through fp32
//      copies of the tiles (C_in*P conversions against 2*C_out*C_in*P flops). A half/bfloat16
//      sum is built in an fp32 tile and rounded once into the output.
//   Where a channels_last tile's GEMM runs on the AVX-512 brgemm without AMX, 1 and 2 take
//   turns in 64-pixel steps (TileGemm::step_rows: the prologue asks for the step's lateral
//   rows); the same ukernel calls, so the same bits.
// The output is the only output-sized allocation (from csrc/cpu/output_cache: memory a dead
// output of an earlier call left mapped).
//
// Backward (deterministic: fixed tiles and chunks, ordered reductions, no atomics, no
// dependence on the thread count):
//   grad_lateral = weight^T @ grad_out        per (n, pixel tile), like the forward;
//   grad_weight  = sum_n grad_out_n @ lateral_n^T: fixed pixel chunks, in order;
//   grad_top     = for each top pixel, the ordered sum over the destination rectangle that
//                  reads it (NearestAxis::first_destination, the exact adjoint);
//   grad_bias    = the sum of those window sums (they partition grad_out): one pass for both.
//
// Layouts: NCHW holds an image as (C, H*W) row-major; channels_last as (H*W, C). Every GEMM
// below is written row-major on strided 2-D views of those buffers (no copies for float/double).
// at::native::cpublas::gemm would avoid the view objects, but libtorch does not export it.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common/op_args.h"
#include "cpu/bf16_gemm.h"
#include "cpu/f32_gemm.h"
#include "cpu/output_cache.h"
#include "cpu/prefetch.h"
#include "cpu/scratch_buffer.h"

namespace fpn_kernels {
namespace {

// Target output pixels per forward/grad_lateral task: the C_out x ~1024 fp32 tile (1 MiB at
// C_out = 256) stays in a core's L2 between the prologue and the GEMM where L2 is 2 MiB (the
// Xeon this was tuned on), in the shared L3 where it is smaller (on the 512 KiB-L2 EPYC of
// 2026-12-01, 512-pixel tiles measured the same). Also measured there: per-thread tiles beat
// the same tiles run one after another with each GEMM on MKL's threads by 10-25%, and ~8 MiB
// chunks one after another on MKL's threads did worse than either.
constexpr int64_t kTilePixels = 1024;
// Target pixels per grad_weight chunk (the GEMM's reduction length); fixed by the shape, so sums
// never depend on the thread count.
constexpr int64_t kChunkPixels = 1024;

template <typename scalar_t>
using acc_t = at::opmath_type<scalar_t>;  // float for half/bfloat16, else scalar_t

template <typename scalar_t>
constexpr bool kAccumulatesInPlace = std::is_same_v<scalar_t, acc_t<scalar_t>>;

// A (rows x cols) view with strides (row_stride, col_stride) of a raw buffer.
template <typename scalar_t>
at::Tensor view2d(const scalar_t* data, int64_t rows, int64_t cols, int64_t row_stride,
                  int64_t col_stride) {
  return at::from_blob(const_cast<scalar_t*>(data), {rows, cols}, {row_stride, col_stride},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value));
}

// A GEMM operand in accumulation precision: the view itself, or an fp32 copy of a half/bf16 tile.
inline at::Tensor as_acc(const at::Tensor& view) {
  return at::isReducedFloatingType(view.scalar_type()) ? view.to(at::kFloat) : view;
}

// c = a @ b (or c += a @ b): at::mm_out honours row- and column-major strides without copies.
// Bits must not depend on the thread count, but torch runs MKL with mkl_set_dynamic(false): even
// inside our parallel region MKL plans a GEMM for torch's thread count, and for a small output
// block with a long reduction that plan splits the reduction (measured here: C_out = 8 from
// C_in = 2048, or a 32 x 24 grad_weight block over 1024 pixels, change bits between 1 and 2
// threads). Such GEMMs get the reduction in fixed slices short enough never to be split.
constexpr int64_t kSplitFreeOutput = int64_t(1) << 16;  // output elements
constexpr int64_t kSplitFreeReduction = 64;

inline void matmul(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const int64_t k = a.size(1);
  const int64_t slice = c.numel() >= kSplitFreeOutput ? k : kSplitFreeReduction;
  for (int64_t k0 = 0; k0 < k || k0 == 0; k0 += slice) {
    const int64_t length = std::min(slice, k - k0);
    const at::Tensor a_k = a.narrow(1, k0, length), b_k = b.narrow(0, k0, length);
    if (accumulate || k0 > 0) {
      at::addmm_out(c, c, a_k, b_k);
    } else {
      at::mm_out(c, a_k, b_k);
    }
    if (k == 0) break;
  }
}

// Runs fn(task) for task in [0, tasks) on the intra-op threads, handing tasks out one at a
// time: a thread that is slowed down (a busy machine) takes fewer tiles instead of making the
// others wait, as at::parallel_for's static split would. Every task's result depends on the
// task alone, so the bits do not depend on which thread ran it.
// Tasks that call ATen ops (the GEMMs) run them in the caller's thread-local state: below
// autograd like the caller, which at::parallel_for's worker threads would not be.
template <typename Fn>
void parallel_tasks(int64_t tasks, const Fn& fn) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(tasks, at::get_num_threads());
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard state_guard(caller_state);
    for (int64_t task = next++; task < tasks; task = next++) fn(task);
  });
}

// One image's pixel tile [p0, p0 + np) of a buffer of `channels` channels: NCHW holds it as
// `channels` rows of np pixels (row stride H*W), channels_last as np rows of `channels`.
template <typename T>
struct Tile {
  T* data;
  int64_t ld;  // row stride
};

template <typename T>
Tile<T> pixel_tile(T* base, int64_t n, int64_t p0, int64_t channels, int64_t hw,
                   bool channels_last) {
  if (channels_last) return {base + (n * hw + p0) * channels, channels};
  return {base + n * channels * hw + p0, hw};
}

// Where a task builds the sum for its output tile (np pixels x `channels`): in the tile itself
// for float/double; for half/bfloat16 in an fp32 scratch tile that store() rounds into the
// output, the one rounding. `avx512`: the tile's GEMM runs on the brgemm (bf16_gemm), so the
// CPU has AVX-512 and the bfloat16 rounding takes bf16_gemm::round_to_bf16 (ATen's copy_
// dispatches to its AVX2 kernel).
template <typename scalar_t>
struct AccTile {
  AccTile(Tile<scalar_t> out, int64_t np, int64_t channels, bool channels_last, bool avx512)
      : out(out),
        rows(channels_last ? np : channels),
        cols(channels_last ? channels : np),
        avx512(avx512) {
    if constexpr (kAccumulatesInPlace<scalar_t>) {
      data = out.data;
      ld = out.ld;
    } else {
      thread_local ScratchBuffer<float> scratch;  // a tile's fp32 sum, 1 MiB at C = 256
      data = scratch.get(rows * cols);
      ld = cols;
    }
  }
  void store() const { store_rows(0, rows, nullptr, 0, 0); }
  // store() of the rows [r0, r1) alone; with `next` (bfloat16 on AVX-512), asks for the first
  // `next_rows` rows of `next_bytes` at `next` (contiguous rows), one per row stored
  // (TileGemm::step_rows).
  void store_rows(int64_t r0, int64_t r1, const void* next, int64_t next_rows,
                  int64_t next_bytes) const {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (avx512) {
        for (int64_t r = r0; r < r1; ++r) {
          if (next && r - r0 < next_rows) {
            prefetch_row(static_cast<const char*>(next) + (r - r0) * next_bytes, next_bytes);
          }
          bf16_gemm::round_to_bf16(data + r * ld, out.data + r * out.ld, cols);
        }
        return;
      }
    }
    if constexpr (!kAccumulatesInPlace<scalar_t>) {
      view2d(out.data + r0 * out.ld, r1 - r0, cols, out.ld, 1)
          .copy_(view2d(data + r0 * ld, r1 - r0, cols, ld, 1));
    }
  }
  Tile<scalar_t> out;
  int64_t rows, cols;
  bool avx512;
  acc_t<scalar_t>* data;
  int64_t ld;
};

// See TileGemm::step_rows.
constexpr int64_t kStepRows = 64;
static_assert(kStepRows % f32_gemm::kBlockM == 0 && kStepRows % bf16_gemm::kBlockM == 0);

// The GEMM of one pixel tile against a fixed matrix F (the weight or its transpose), in the
// tile's layout; c is the tile's sum (accumulation precision, row stride ldc):
//   NCHW:          c (F rows x np) [+]= F (F rows x K) @ tile (K x np);
//   channels_last: c (np x F cols) [+]= tile (np x K) @ F (K x F cols).
// On oneDNN's brgemm: bfloat16 where bf16_gemm::usable says so (F is packed once per call, an
// NCHW tile once per task), float32 where f32_gemm::available (F read in place, a contiguous
// copy of a transposed view once per call; the tile in place); everything else goes through
// matmul (MKL), half/bfloat16 as fp32 copies.
template <typename scalar_t>
class TileGemm {
 public:
  TileGemm(const at::Tensor& fixed, bool channels_last)
      : channels_last_(channels_last),
        k_(channels_last ? fixed.size(0) : fixed.size(1)),
        f_rows_(fixed.size(0)),
        f_cols_(fixed.size(1)) {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      use_brgemm_ = bf16_gemm::usable(k_);
      if (use_brgemm_ && bf16_gemm::isa() == bf16_gemm::Isa::kAvx512Bf16) {
        if (channels_last) step_rows_ = kStepRows;
        else pack_columns_ = bf16_gemm::PackedB::kBlockN;
      }
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      use_brgemm_ = k_ > 0 && f32_gemm::available();
      if (use_brgemm_ && channels_last) step_rows_ = kStepRows;
      if (use_brgemm_) {
        // F row-major (channels_last: the B operand, NCHW: the A operand): the weight in place
        // (channels_last grad_lateral, NCHW forward); its transpose copied into f32_fixed_,
        // outside ATen's allocator, so the call's only allocation in torch's memory profile
        // stays its output.
        if (fixed.is_contiguous()) {
          f32_fixed_data_ = fixed.const_data_ptr<float>();
        } else {
          f32_fixed_.resize(f_rows_ * f_cols_);
          view2d(f32_fixed_.data(), f_rows_, f_cols_, f_cols_, 1).copy_(fixed);
          f32_fixed_data_ = f32_fixed_.data();
        }
        return;
      }
    }
    if (!use_brgemm_) {
      fixed_acc_ = as_acc(fixed);  // a view for float/double, an fp32 copy for half/bfloat16
      return;
    }
    if (!channels_last) {
      fixed_ = fixed.contiguous();  // the A operand, read in place
    } else if (fixed.stride(0) == 1) {  // weight^T: a transposed view of the weight
      packed_fixed_.pack_transposed(fixed.const_data_ptr<at::BFloat16>(), f_rows_, f_cols_,
                                    fixed.stride(1));
    } else {
      const at::Tensor rows_contiguous = fixed.contiguous();
      packed_fixed_.pack(rows_contiguous.const_data_ptr<at::BFloat16>(), f_rows_, f_cols_,
                         f_cols_);
    }
  }

  bool uses_brgemm() const { return use_brgemm_; }

  // Pixels per prologue-and-GEMM step of a channels_last forward tile, or 0 for the whole tile
  // at once. On the AVX-512 brgemm without AMX the ukernel ran 8% slower on A rows fresh from
  // memory than on rows in L3 (Zen 4, 64 x 128 x 1024 fp32 calls, one thread: 106.6 against
  // 114.6 GFLOP/s; 115.8 in L1/L2, where the FMA peak is 118), and prefetching a block's A
  // before its call stalled as long as the misses it saved. So a tile runs in 64-pixel steps,
  // each step's prologue asking for its pixels' lateral rows among its own stores, right
  // before the step's GEMM reads them (R50 levels, N = 2, interleaved in one process, 25 calls
  // each, medians, whole tiles -> steps: fp32 P4 18.7 -> 18.5 ms, P3 37.7 -> 36.9, P2 78.8 ->
  // 75.1; bf16 P4 and P3 within 0.5%, P2 43.7 -> 41.2). The steps are whole row blocks of both
  // GEMMs, so their ukernel calls and bits are the tile's. AMX CPUs (bf16) keep whole tiles:
  // not measured there. The bf16 channels_last grad_lateral (steps_grad_lateral) runs in the
  // same steps, each step's rounding stores asking for the next step's grad_out rows: P4
  // 10.0 -> 10.0 ms, P3 20.2 -> 19.6, P2 42.3 -> 40.0 (same conditions); the fp32 one, whose
  // GEMM writes grad_lateral itself, has no stores to hide them among and keeps whole tiles.
  int64_t step_rows() const { return step_rows_; }
  bool steps_grad_lateral() const {
    return std::is_same_v<scalar_t, at::BFloat16> && step_rows_ > 0;
  }

  void run(Tile<const scalar_t> tile, int64_t np, acc_t<scalar_t>* c, int64_t ldc,
           bool accumulate) const {
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (use_brgemm_) {
        if (channels_last_) {
          bf16_gemm::gemm(tile.data, np, tile.ld, packed_fixed_, c, ldc, accumulate);
        } else {
          // Per thread, reused by its next tiles and calls: at most K x 1024 bf16 (4 MiB at
          // C_in = 2048), instead of a fresh, page-faulting buffer per tile. Without AMX the
          // tile is packed one 64-pixel column block at a time, each block's GEMM right after
          // its pack, while the block (K x 64) is in L2: R50 P4 forward 11.7 -> 11.2 ms (Zen 4,
          // interleaved in one process, 50 calls each, medians), P3, P2 and grad_lateral
          // within 2%. The blocks are the whole tile's column blocks: same ukernel calls, same
          // bits. AMX CPUs pack the whole tile: not measured there.
          thread_local bf16_gemm::PackedB packed_tile;
          const int64_t block = pack_columns_ ? pack_columns_ : np;
          for (int64_t j0 = 0; j0 < np; j0 += block) {
            const int64_t cols = std::min(block, np - j0);
            packed_tile.pack(tile.data + j0, k_, cols, tile.ld);
            bf16_gemm::gemm(fixed_.const_data_ptr<at::BFloat16>(), f_rows_, k_, packed_tile,
                            c + j0, ldc, accumulate);
          }
        }
        return;
      }
    }
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (use_brgemm_ && channels_last_) {
        f32_gemm::gemm(tile.data, np, k_, tile.ld, f32_fixed_data_, f_cols_, f_cols_, c, ldc,
                       accumulate);
        return;
      }
      if (use_brgemm_) {
        f32_gemm::gemm(f32_fixed_data_, f_rows_, k_, f_cols_, tile.data, np, tile.ld, c, ldc,
                       accumulate);
        return;
      }
    }
    if (channels_last_) {
      at::Tensor c_view = view2d(c, np, f_cols_, ldc, 1);
      matmul(c_view, as_acc(view2d(tile.data, np, k_, tile.ld, 1)), fixed_acc_, accumulate);
    } else {
      at::Tensor c_view = view2d(c, f_rows_, np, ldc, 1);
      matmul(c_view, fixed_acc_, as_acc(view2d(tile.data, k_, np, tile.ld, 1)), accumulate);
    }
  }

 private:
  bool channels_last_;
  int64_t k_, f_rows_, f_cols_;
  bool use_brgemm_ = false;
  int64_t step_rows_ = 0;  // step_rows(), fixed with use_brgemm_ at construction
  int64_t pack_columns_ = 0;  // bf16 NCHW: pixels per pack of the tile (0: all at once)
  at::Tensor fixed_acc_;             // MKL path: F in accumulation precision
  at::Tensor fixed_;                 // brgemm path, NCHW: F contiguous (bf16)
  bf16_gemm::PackedB packed_fixed_;  // brgemm path, channels_last: F packed
  std::vector<float> f32_fixed_;           // float32 brgemm path: F copied row-major, or empty
  const float* f32_fixed_data_ = nullptr;  // ... and where F is read
};

// Destination tables of one axis: src[dst], and (backward) the adjoint's ranges.
// The gather's shape, recognised from the table (not re-derived): FPN's common cases get
// loops the compiler vectorizes.
enum class GatherKind { kIdentity, kDouble, kGeneral };

struct AxisTables {
  std::vector<int64_t> src;    // src[dst]
  std::vector<int64_t> begin;  // dst in [begin[s], begin[s+1]) read source s
  GatherKind kind = GatherKind::kGeneral;
};

AxisTables axis_tables(const NearestAxis& axis, bool with_adjoint) {
  AxisTables t{source_table(axis), {}, GatherKind::kGeneral};
  bool identity = true, twice = true;
  for (int64_t d = 0; d < axis.out_size; ++d) {
    identity = identity && t.src[d] == d;
    twice = twice && t.src[d] == (d >> 1);
  }
  t.kind = identity ? GatherKind::kIdentity : twice ? GatherKind::kDouble : GatherKind::kGeneral;
  if (with_adjoint) t.begin = destination_begin_table(axis);
  return t;
}

// up[x] = bias + row[src[x]] for x in [x0, x1), in accumulation precision.
template <typename scalar_t, typename acc_type>
void gather_row(const scalar_t* __restrict__ row, const int64_t* __restrict__ src,
                GatherKind kind, acc_type bias, int64_t x0, int64_t x1,
                acc_type* __restrict__ up) {
  switch (kind) {
    case GatherKind::kIdentity:
      for (int64_t x = x0; x < x1; ++x) up[x] = bias + static_cast<acc_type>(row[x]);
      break;
    case GatherKind::kDouble: {
      int64_t x = x0;
      if (x & 1) {
        up[x] = bias + static_cast<acc_type>(row[x >> 1]);
        ++x;
      }
      for (; x + 1 < x1; x += 2) {
        const acc_type v = bias + static_cast<acc_type>(row[x >> 1]);
        up[x] = v;
        up[x + 1] = v;
      }
      if (x < x1) up[x] = bias + static_cast<acc_type>(row[x >> 1]);
      break;
    }
    case GatherKind::kGeneral:
      for (int64_t x = x0; x < x1; ++x) up[x] = bias + static_cast<acc_type>(row[src[x]]);
      break;
  }
}

struct Shape {
  int64_t n, c_in, c_out, h, w, top_h, top_w;
  int64_t pixels() const { return h * w; }
  int64_t top_pixels() const { return top_h * top_w; }
};

Shape shape_of(const at::Tensor& lateral, const at::Tensor& weight, int64_t top_h,
               int64_t top_w) {
  return Shape{lateral.size(0), lateral.size(1), weight.size(0), lateral.size(2),
               lateral.size(3), top_h, top_w};
}

// Pixel tiles of every image, numbered n * per_image + t. A tile is a contiguous pixel range
// [start, start + length): whole output rows when a row is shorter than `target`, else one
// segment of a row, so the prologue walks few row segments. The partition depends on the
// shape only (never on the thread count).
struct Tiles {
  int64_t h, w, rows_per_tile, segments_per_row, segment, per_image;
  Tiles(int64_t h, int64_t w, int64_t target)
      : h(h),
        w(w),
        rows_per_tile(w >= target ? 1 : target / w),
        segments_per_row(w >= target ? (w + target - 1) / target : 1),
        segment((w + segments_per_row - 1) / segments_per_row),
        per_image(((h + rows_per_tile - 1) / rows_per_tile) * segments_per_row) {}
  int64_t image(int64_t task) const { return task / per_image; }
  int64_t start(int64_t task) const {
    const int64_t t = task % per_image;
    return (t / segments_per_row) * rows_per_tile * w + (t % segments_per_row) * segment;
  }
  int64_t length(int64_t task) const {
    const int64_t t = task % per_image;
    if (segments_per_row > 1) return std::min(segment, w - (t % segments_per_row) * segment);
    return std::min(rows_per_tile, h - (t / segments_per_row) * rows_per_tile) * w;
  }
};

// --------------------------------------------------------------------------- forward

// The forward writes bias + gathered top into the output tile first (the "prologue"), then
// the GEMM accumulates onto it (beta = 1): the tile is touched by one streaming pass and the
// GEMM's own store, instead of a GEMM store plus a read-modify-write epilogue pass.

// c[o, p] = bias[o] + top[n, o, src_row(y), src_col(x)] for the tile's pixels p = y * W + x;
// c's row o starts at c + o * ldc and is indexed from the tile start p0.
template <typename scalar_t>
void prologue_nchw(const Shape& s, int64_t n, int64_t p0, int64_t np, acc_t<scalar_t>* c,
                   int64_t ldc, const scalar_t* bias, const scalar_t* top,
                   const AxisTables& rows, const AxisTables& cols) {
  using acc_type = acc_t<scalar_t>;
  for (int64_t o = 0; o < s.c_out; ++o) {
    const acc_type b = bias ? static_cast<acc_type>(bias[o]) : acc_type(0);
    const scalar_t* top_plane = top + (n * s.c_out + o) * s.top_pixels();
    acc_type* c_row = c + o * ldc - p0;  // indexed by the image pixel p
    // Walk the tile [p0, p0 + np) one output-row segment [x0, x1) at a time; a full row that
    // reads the same source row as the full row before it is a copy of that row.
    for (int64_t p = p0; p < p0 + np;) {
      const int64_t y = p / s.w, x0 = p - y * s.w;
      const int64_t x1 = std::min(s.w, x0 + (p0 + np - p));
      acc_type* dst = c_row + y * s.w;
      if (x0 == 0 && x1 == s.w && p - s.w >= p0 && rows.src[y] == rows.src[y - 1]) {
        std::copy(dst - s.w, dst, dst);
      } else {
        gather_row(top_plane + rows.src[y] * s.top_w, cols.src.data(), cols.kind, b, x0, x1,
                   dst);
      }
      p += x1 - x0;
    }
  }
}

// c[p, o] = bias[o] + top[n, src_row(y), src_col(x), o] (channels_last: contiguous C_out rows);
// bias already in accumulation precision (or null). `avx512`: AVX-512 is there (see AccTile).
// `lateral_rows` (or null): the lateral row of pixel p0, whose C_in channels are asked for
// pixel by pixel among the prologue's stores (TileGemm::step_rows says why).
template <typename scalar_t>
void prologue_channels_last(const Shape& s, int64_t n, int64_t p0, int64_t np,
                            acc_t<scalar_t>* c, const acc_t<scalar_t>* bias,
                            const scalar_t* top, const AxisTables& rows, const AxisTables& cols,
                            bool avx512, const scalar_t* lateral_rows) {
  using acc_type = acc_t<scalar_t>;
  for (int64_t p = p0; p < p0 + np; ++p) {
    const int64_t y = p / s.w, x = p - y * s.w;
    const scalar_t* __restrict__ top_pixel =
        top + ((n * s.top_h + rows.src[y]) * s.top_w + cols.src[x]) * s.c_out;
    acc_type* __restrict__ dst = c + (p - p0) * s.c_out;
    if (lateral_rows) {
      prefetch_row(lateral_rows + (p - p0) * s.c_in, s.c_in * int64_t(sizeof(scalar_t)));
    }
    if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
      if (avx512) {
        bf16_gemm::widen_add(top_pixel, bias, dst, s.c_out);
        continue;
      }
    }
    if (bias) {
      for (int64_t o = 0; o < s.c_out; ++o) dst[o] = bias[o] + static_cast<acc_type>(top_pixel[o]);
    } else {
      for (int64_t o = 0; o < s.c_out; ++o) dst[o] = static_cast<acc_type>(top_pixel[o]);
    }
  }
}

template <typename scalar_t>
void forward_kernel(const Shape& s, const scalar_t* lateral, const at::Tensor& weight,
                    const scalar_t* bias, const scalar_t* top, at::Tensor& out,
                    bool channels_last, const AxisTables& rows, const AxisTables& cols) {
  const int64_t hw = s.pixels();
  const Tiles tiles(s.h, s.w, kTilePixels);
  // NCHW: out_tile (C_out, P) += weight (C_out, C_in) @ lateral_tile (C_in, P);
  // channels_last: out_tile (P, C_out) += lateral_tile (P, C_in) @ weight^T (C_in, C_out).
  const TileGemm<scalar_t> gemm(channels_last ? weight.t() : weight, channels_last);
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  std::vector<acc_t<scalar_t>> bias_values;  // channels_last reads bias once per pixel
  if (bias) bias_values.assign(bias, bias + s.c_out);
  const acc_t<scalar_t>* bias_acc = bias ? bias_values.data() : nullptr;
  parallel_tasks(s.n * tiles.per_image, [&](int64_t task) {
    const int64_t n = tiles.image(task), p0 = tiles.start(task), np = tiles.length(task);
    const AccTile<scalar_t> sum(pixel_tile(out_data, n, p0, s.c_out, hw, channels_last), np,
                                s.c_out, channels_last, gemm.uses_brgemm());
    if (!channels_last) {
      prologue_nchw<scalar_t>(s, n, p0, np, sum.data, sum.ld, bias, top, rows, cols);
      gemm.run(pixel_tile(lateral, n, p0, s.c_in, hw, false), np, sum.data, sum.ld,
               /*accumulate=*/true);
      sum.store();
      return;
    }
    const int64_t step = gemm.step_rows() ? gemm.step_rows() : np;
    for (int64_t r = 0; r < np; r += step) {
      const int64_t rows_here = std::min(step, np - r);
      const Tile<const scalar_t> lateral_rows = pixel_tile(lateral, n, p0 + r, s.c_in, hw, true);
      prologue_channels_last<scalar_t>(s, n, p0 + r, rows_here, sum.data + r * sum.ld, bias_acc,
                                       top, rows, cols, gemm.uses_brgemm(),
                                       gemm.step_rows() ? lateral_rows.data : nullptr);
      gemm.run(lateral_rows, rows_here, sum.data + r * sum.ld, sum.ld, /*accumulate=*/true);
    }
    sum.store();
  });
}

at::Tensor fused_forward_cpu(const at::Tensor& lateral, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias, const at::Tensor& top,
                             c10::string_view mode, std::optional<at::ArrayRef<double>> scale_factor,
                             bool channels_last, c10::string_view index_kernel) {
  check_forward_args(lateral, weight, bias, top, channels_last);
  const Shape s = shape_of(lateral, weight, top.size(2), top.size(3));
  const UpsampleGeometry g = make_geometry(s.top_h, s.top_w, s.h, s.w,
                                           std::string_view(mode.data(), mode.size()),
                                           scale_factor,
                                           std::string_view(index_kernel.data(), index_kernel.size()),
                                           lateral.scalar_type() == at::kDouble);
  const AxisTables rows = axis_tables(g.rows, false), cols = axis_tables(g.cols, false);
  at::Tensor out = empty_output({s.n, s.c_out, s.h, s.w}, lateral.scalar_type(),
                                memory_format(channels_last));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lateral.scalar_type(),
                                  "fused_forward_cpu", [&] {
    forward_kernel<scalar_t>(s, lateral.const_data_ptr<scalar_t>(), weight,
                             bias.has_value() ? bias->const_data_ptr<scalar_t>() : nullptr,
                             top.const_data_ptr<scalar_t>(), out, channels_last, rows, cols);
  });
  return out;
}

// --------------------------------------------------------------------------- backward

// grad_lateral's tiles have C_in channels, up to 2048 against the forward's C_out = 256. A
// half/bfloat16 tile's sum is built in fp32 scratch (AccTile), 4 MiB for 1024 pixels at
// C_in = 1024: channels_last tiles hold ~kScratchElements of it instead, which stays in L2
// between the GEMM and the rounding. Measured on the AMX Xeon (2026-12-03, interleaved, 21
// calls each, same bits): bf16 channels_last P4 (C_in 1024) 10-13% faster, P3 (512) within
// noise; NCHW at the same size 0-2% slower, so it keeps kTilePixels (as float/double, whose
// sum is the output itself).
constexpr int64_t kScratchElements = int64_t(1) << 18;  // 1 MiB of fp32

template <typename scalar_t>
int64_t grad_lateral_tile_pixels(int64_t c_in, bool channels_last) {
  if (kAccumulatesInPlace<scalar_t> || !channels_last) return kTilePixels;
  return std::clamp<int64_t>(kScratchElements / c_in, 1, kTilePixels);
}

template <typename scalar_t>
void grad_lateral_kernel(const Shape& s, const scalar_t* grad_out, const at::Tensor& weight,
                         at::Tensor& grad_lateral, bool channels_last) {
  const int64_t hw = s.pixels();
  const Tiles tiles(s.h, s.w, grad_lateral_tile_pixels<scalar_t>(s.c_in, channels_last));
  // NCHW: grad_lateral_tile (C_in, P) = weight^T (C_in, C_out) @ grad_tile (C_out, P);
  // channels_last: grad_lateral_tile (P, C_in) = grad_tile (P, C_out) @ weight (C_out, C_in).
  const TileGemm<scalar_t> gemm(channels_last ? weight : weight.t(), channels_last);
  scalar_t* grad_lateral_data = grad_lateral.mutable_data_ptr<scalar_t>();
  parallel_tasks(s.n * tiles.per_image, [&](int64_t task) {
    const int64_t n = tiles.image(task), p0 = tiles.start(task), np = tiles.length(task);
    const AccTile<scalar_t> sum(pixel_tile(grad_lateral_data, n, p0, s.c_in, hw, channels_last),
                                np, s.c_in, channels_last, gemm.uses_brgemm());
    if (!gemm.steps_grad_lateral()) {  // (steps imply channels_last)
      gemm.run(pixel_tile(grad_out, n, p0, s.c_out, hw, channels_last), np, sum.data, sum.ld,
               /*accumulate=*/false);
      sum.store();
      return;
    }
    // In steps (TileGemm::step_rows): a step's rounding stores ask for the next step's rows of
    // grad_out, the A its GEMM reads.
    const int64_t step = gemm.step_rows();
    for (int64_t r = 0; r < np; r += step) {
      const int64_t rows_here = std::min(step, np - r);
      gemm.run(pixel_tile(grad_out, n, p0 + r, s.c_out, hw, true), rows_here,
               sum.data + r * sum.ld, sum.ld, /*accumulate=*/false);
      const int64_t next_rows = std::max<int64_t>(0, std::min(step, np - (r + step)));
      const scalar_t* next =
          next_rows > 0 ? pixel_tile(grad_out, n, p0 + r + step, s.c_out, hw, true).data : nullptr;
      sum.store_rows(r, r + rows_here, next, next_rows, s.c_out * int64_t(sizeof(scalar_t)));
    }
  });
}

// acc (rows x cols, row stride ldc) += grad (rows) x lateral (cols), element strides as given:
// the rank-1 update of a bfloat16 chunk's odd last pixel, in fp32.
void add_odd_pixel(float* acc, int64_t ldc, const at::BFloat16* grad, int64_t grad_stride,
                   int64_t rows, const at::BFloat16* lateral, int64_t lateral_stride,
                   int64_t cols) {
  for (int64_t o = 0; o < rows; ++o) {
    const float g = static_cast<float>(grad[o * grad_stride]);
    float* acc_row = acc + o * ldc;
    for (int64_t i = 0; i < cols; ++i) {
      acc_row[i] += g * static_cast<float>(lateral[i * lateral_stride]);
    }
  }
}

// The longest even part of a chunk of `chunks` (the bf16 GEMMs' reduction length).
int64_t longest_even_chunk(const Tiles& chunks) {
  int64_t longest = 0;
  for (int64_t chunk = 0; chunk < chunks.per_image; ++chunk) {
    longest = std::max(longest, chunks.length(chunk) & ~int64_t(1));
  }
  return longest;
}

// grad_weight's rows [0, rows) in `count` groups of `size` rows (the last may be shorter), as
// close to `wanted` groups as groups whose starts are multiples of `align` allow: a GEMM that
// runs in blocks of `align` rows makes the same calls on a group as on all rows, so the bits do
// not depend on how many groups the thread count asked for.
struct RowGroups {
  RowGroups(int64_t rows, int64_t wanted, int64_t align)
      : size(((rows + wanted - 1) / wanted + align - 1) / align * align),
        count((rows + size - 1) / size) {}
  int64_t size, count;
};

// grad_weight (below) for bfloat16 on the brgemm (bf16_gemm): per chunk of pixels, the even
// part [p0, p0 + k) is one GEMM on bf16 operands (the ukernel multiplies pairs along the
// reduction), an odd last pixel a rank-1 fp32 update. A is grad_chunk (C_out, k) row-major, B
// lateral_chunk^T (k, C_in), packed by the thread that multiplies it in column blocks of 64.
//
// The work is split once, not per chunk: an owner (a task of one parallel region) holds a block
// of grad_weight rows and every `column_owners`-th column block of it, and runs all chunks in
// order. The threads go to column blocks first (each owner holding all of C_out), or to row
// blocks first (each owner holding all of C_in): see grad_weight_kernel_brgemm. No thread
// reads what another wrote and no block of grad_weight changes thread between chunks; each
// element's sum (chunks in order, the ukernel's fixed order inside one) is the same for any
// thread count (row blocks start at multiples of bf16_gemm::kBlockM). A task per column block
// per chunk, which this replaced (same bits), moved half of every A and of grad_weight between
// the cores: on the Zen 4 EPYC (2026-12-07) the VM has slow spells in which that
// channels_last grad_weight lost 15-50% and oneDNN's backward-weights nothing
// (grad_weight_kernel_brgemm).
struct GradWeightOwners {
  GradWeightOwners(int64_t c_in, int64_t c_out, bool rows_first) : c_out(c_out) {
    constexpr int64_t kRowAlign = bf16_gemm::kBlockM;
    blocks = (c_in + kColBlock - 1) / kColBlock;
    if (blocks == 0 || c_out == 0) return;  // an empty grad_weight: no owners
    const int64_t threads = at::get_num_threads();
    const int64_t row_blocks = (c_out + kRowAlign - 1) / kRowAlign;
    int64_t wanted_row_groups;
    if (rows_first) {
      wanted_row_groups = std::min(threads, row_blocks);
      column_owners = std::clamp<int64_t>(threads / wanted_row_groups, 1, blocks);
    } else {
      column_owners = std::min(blocks, threads);
      wanted_row_groups = std::clamp<int64_t>(threads / column_owners, 1, row_blocks);
    }
    const RowGroups groups(c_out, wanted_row_groups, kRowAlign);
    rows_per_group = groups.size;
    row_groups = groups.count;
  }
  // Runs body(r0, rows, first_block) once per owner, on the intra-op threads; the owner's
  // column blocks are first_block, first_block + column_owners, ... below `blocks`.
  template <typename Body>
  void run(const Body& body) const {
    parallel_tasks(column_owners * row_groups, [&](int64_t owner) {
      const int64_t r0 = owner / column_owners * rows_per_group;
      body(r0, std::min(rows_per_group, c_out - r0), owner % column_owners);
    });
  }
  static constexpr int64_t kColBlock = bf16_gemm::PackedB::kBlockN;
  int64_t c_out, blocks, column_owners = 0, rows_per_group = 0, row_groups = 0;
};

// NCHW: A is grad_out itself (an owner's rows, row stride H*W), and an owner packs its column
// blocks of B from lateral's rows (pack_transposed): split by columns first, the threads share
// neither packs nor reads. channels_last: pixels are the reduction, so A must be a transposed
// copy of grad_out's rows: each owner transposes its rows of the chunk's grad_out into its own
// buffer and packs its column blocks of lateral (pack). Whichever of the two the split leaves
// whole is done by every owner: split by columns first, every thread transposes all of
// grad_out (C_out x k); by rows first, every thread packs all of lateral (C_in x k), a
// streaming copy that costs about half a transpose per element. So channels_last splits rows
// first where C_in <= 2 * C_out (R50's P2 and P3), columns first above (P4).
// Measured on the Zen 4 EPYC (2026-12-07, interleaved in one process, 11-15 calls each,
// grad_weight alone, bf16 channels_last, 2 threads; rows first vs columns first, oneDNN's
// backward-weights beside): quiet minutes P2 46.0-46.3 vs 48.1-48.4 ms (oneDNN 45.0-45.1), P3
// 22.0-22.4 vs 22.0-22.6, P4 10.7-11.3 vs 10.6-11.5; slow spells P2 50.9-52.5 vs 56.2-56.5, P3
// 24.2-27.8 vs 25.8-29.8. NCHW rows first: P2 39.6-40.0 vs 38.4-38.8, P3 20.0-20.2 vs 19.3-19.7.
// The split per chunk that the owners replaced (transposes of the next chunk's grad_out in
// 64-channel tasks beside this chunk's GEMMs), same machine, same day: quiet P4 10.8-10.9,
// P3 21.6-21.8, P2 44.4-45.0 ms; slow spells P4 13.3, P3 28.4, P2 67.7.
void grad_weight_kernel_brgemm(const Shape& s, const at::BFloat16* grad_out,
                               const at::BFloat16* lateral, float* acc, bool channels_last) {
  constexpr int64_t kColBlock = GradWeightOwners::kColBlock;
  const int64_t hw = s.pixels();
  const Tiles chunks(s.h, s.w, kChunkPixels);
  const GradWeightOwners owners(s.c_in, s.c_out,
                                /*rows_first=*/channels_last && s.c_in <= 2 * s.c_out);
  const int64_t longest = channels_last ? longest_even_chunk(chunks) : 0;
  owners.run([&](int64_t r0, int64_t rows, int64_t first_block) {
    // channels_last: this owner's rows of grad_chunk^T (rows, k). Both kept for later calls.
    thread_local ScratchBuffer<at::BFloat16> grad_t_buffer;
    thread_local bf16_gemm::PackedB packed;
    at::BFloat16* grad_t = grad_t_buffer.get(rows * longest);
    for (int64_t chunk = 0; chunk < s.n * chunks.per_image; ++chunk) {
      const int64_t n = chunks.image(chunk), p0 = chunks.start(chunk), np = chunks.length(chunk);
      const int64_t k = np & ~int64_t(1);
      // A (rows, k) with row stride lda; the odd last pixel's grad values (one per row) and
      // lateral values (one per channel) with their strides.
      const at::BFloat16 *a, *grad_odd, *lateral_chunk, *lateral_odd;
      int64_t lda, grad_step, lateral_step;
      if (!channels_last) {
        a = grad_out + (n * s.c_out + r0) * hw + p0;  // (rows, np)
        lateral_chunk = lateral + n * s.c_in * hw + p0;  // (C_in, np)
        lda = grad_step = lateral_step = hw;
        grad_odd = a + k, lateral_odd = lateral_chunk + k;
      } else {
        const at::BFloat16* grad_rows = grad_out + (n * hw + p0) * s.c_out + r0;  // (np, rows)
        lateral_chunk = lateral + (n * hw + p0) * s.c_in;  // (np, C_in)
        if (k > 0) bf16_gemm::transpose(grad_rows, k, rows, s.c_out, grad_t, k);
        a = grad_t, lda = k;
        grad_step = lateral_step = 1;
        grad_odd = grad_rows + k * s.c_out, lateral_odd = lateral_chunk + k * s.c_in;
      }
      for (int64_t block = first_block; block < owners.blocks; block += owners.column_owners) {
        const int64_t i0 = block * kColBlock, cols = std::min(kColBlock, s.c_in - i0);
        float* acc_block = acc + r0 * s.c_in + i0;
        if (k > 0) {
          if (!channels_last) {
            packed.pack_transposed(lateral_chunk + i0 * hw, k, cols, hw);
          } else {
            packed.pack(lateral_chunk + i0, k, cols, s.c_in);
          }
          bf16_gemm::gemm(a, rows, lda, packed, acc_block, s.c_in, /*accumulate=*/true);
        }
        if (np > k) {
          add_odd_pixel(acc_block, s.c_in, grad_odd, grad_step, rows,
                        lateral_odd + i0 * lateral_step, lateral_step, cols);
        }
      }
    }
  });
}

// grad_weight (below) for float32 channels_last on oneDNN's fp32 brgemm (f32_gemm), the way
// oneDNN's own backward-weights splits it: a task per block of kGradWeightRows grad_weight rows
// (C_out) owns the whole pixel reduction for them, panel by panel of kGradWeightPanel pixels,
// in pixel order: A is the panel's grad_out^T (rows, panel) transposed into thread-local memory
// (pixels are the reduction, so they must be A's contiguous axis), B the panel's lateral
// (panel, C_in) read in place. No barrier per chunk and no shared output; each element's sum
// (panels in order, the ukernel's fixed order inside one) does not depend on the thread count.
// Measured on the Zen 4 EPYC (2026-12-04, interleaved, 9 calls each, grad_weight alone) against
// MKL per 1024-pixel chunk: P4 25.7 -> 22.5 ms, P3 57.5 -> 50.5, P2 121.9 -> 102.1 (eager's
// oneDNN 24.5, 46.9, 101.2); 64-row blocks and 512-pixel panels were 3-12% slower.
constexpr int64_t kGradWeightRows = 128;
constexpr int64_t kGradWeightPanel = 256;

void grad_weight_kernel_f32_brgemm(const Shape& s, const float* grad_out, const float* lateral,
                                   float* acc) {
  const int64_t pixels = s.n * s.pixels();  // channels_last: the images' pixels, one run
  parallel_tasks((s.c_out + kGradWeightRows - 1) / kGradWeightRows, [&](int64_t task) {
    const int64_t o0 = task * kGradWeightRows, rows = std::min(kGradWeightRows, s.c_out - o0);
    thread_local ScratchBuffer<float> panel_buffer;
    float* panel = panel_buffer.get(rows * kGradWeightPanel);
    for (int64_t p0 = 0; p0 < pixels; p0 += kGradWeightPanel) {
      const int64_t k = std::min(kGradWeightPanel, pixels - p0);
      f32_gemm::transpose(grad_out + p0 * s.c_out + o0, k, rows, s.c_out, panel, k);
      f32_gemm::gemm(panel, rows, k, k, lateral + p0 * s.c_in, s.c_in, s.c_in,
                     acc + o0 * s.c_in, s.c_in, /*accumulate=*/true);
    }
  });
}

// grad_weight for float32 NCHW on the same ukernel: the transposes change sides. Per image,
// panel by panel of kGradWeightPanel pixels in order, A is the panel of grad_out (rows, panel:
// pixels are contiguous, read in place) and B the panel's lateral^T (panel, cols), transposed
// from lateral's rows by the task that owns those columns. A task owns a block of
// f32_gemm::kBlockN grad_weight columns, and a group of rows (multiples of f32_gemm::kBlockM)
// only where there are fewer column blocks than threads (R50's P2 on more than two threads;
// each row group then transposes its columns' lateral again). Nothing written is shared, and
// every task makes the ukernel calls one task doing all of it would make on its block, so the
// bits do not depend on the thread count. Measured on the Zen 4 EPYC (2026-12-07, interleaved
// in one process, 9 calls each, grad_weight alone) against MKL per 1024-pixel chunk
// (grad_weight_kernel): P4 22.3-22.5 -> 19.5-19.7 ms, P3 44.0-45.0 -> 38.5-39.4, P2 91.0-93.1
// -> 76.7-77.5 (eager's oneDNN, NCHW: 22.4-22.7, 63.0-66.5, 164-170); 128-pixel panels 5-10%
// slower, 512 and 1024 within 4% of 256.
void grad_weight_kernel_f32_brgemm_nchw(const Shape& s, const float* grad_out,
                                        const float* lateral, float* acc) {
  constexpr int64_t kCols = f32_gemm::kBlockN, kRowAlign = f32_gemm::kBlockM;
  if (s.c_in == 0 || s.c_out == 0) return;  // an empty grad_weight: no tasks
  const int64_t hw = s.pixels();
  const int64_t column_blocks = (s.c_in + kCols - 1) / kCols;
  const RowGroups row_groups(
      s.c_out,
      std::clamp<int64_t>((at::get_num_threads() + column_blocks - 1) / column_blocks, 1,
                          (s.c_out + kRowAlign - 1) / kRowAlign),
      kRowAlign);
  parallel_tasks(column_blocks * row_groups.count, [&](int64_t task) {
    const int64_t i0 = task % column_blocks * kCols, cols = std::min(kCols, s.c_in - i0);
    const int64_t o0 = task / column_blocks * row_groups.size;
    const int64_t rows = std::min(row_groups.size, s.c_out - o0);
    thread_local ScratchBuffer<float> panel_buffer;
    float* panel = panel_buffer.get(kGradWeightPanel * kCols);
    for (int64_t n = 0; n < s.n; ++n) {
      const float* grad_rows = grad_out + (n * s.c_out + o0) * hw;  // (rows, hw)
      const float* lateral_rows = lateral + (n * s.c_in + i0) * hw;  // (cols, hw)
      for (int64_t p0 = 0; p0 < hw; p0 += kGradWeightPanel) {
        const int64_t k = std::min(kGradWeightPanel, hw - p0);
        f32_gemm::transpose(lateral_rows + p0, cols, k, hw, panel, cols);
        f32_gemm::gemm(grad_rows + p0, rows, k, hw, panel, cols, cols,
                       acc + o0 * s.c_in + i0, s.c_in, /*accumulate=*/true);
      }
    }
  });
}

// grad_weight (C_out, C_in) = sum over pixel chunks, in order, of grad_chunk (C_out, P) @
// lateral_chunk^T (P, C_in), where no brgemm above takes it. Each chunk's GEMM is called from
// this thread and uses MKL's own threads over the (C_out, C_in) output. The chunk order is
// fixed and small outputs take matmul's fixed reduction slices, so the bits do not depend on
// the thread count. (A per-thread split of the chunks was once measured ~2.5x slower, but in a
// build whose at::parallel_for ran serially (no OpenMP, see setup.py): that comparison is
// worth redoing.)
template <typename scalar_t>
void grad_weight_kernel(const Shape& s, const scalar_t* grad_out, const scalar_t* lateral,
                        at::Tensor& weight_acc, bool channels_last) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (bf16_gemm::available()) {
      grad_weight_kernel_brgemm(s, grad_out, lateral, weight_acc.mutable_data_ptr<float>(),
                                channels_last);
      return;
    }
  }
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (f32_gemm::available()) {
      float* acc = weight_acc.mutable_data_ptr<float>();
      if (channels_last) {
        grad_weight_kernel_f32_brgemm(s, grad_out, lateral, acc);
      } else {
        grad_weight_kernel_f32_brgemm_nchw(s, grad_out, lateral, acc);
      }
      return;
    }
  }
  const int64_t hw = s.pixels();
  const Tiles chunks(s.h, s.w, kChunkPixels);
  for (int64_t chunk = 0; chunk < s.n * chunks.per_image; ++chunk) {
    const int64_t n = chunks.image(chunk), p0 = chunks.start(chunk), np = chunks.length(chunk);
    const int64_t pixel = n * hw + p0;
    // grad_chunk (C_out, P) and lateral_chunk^T (P, C_in), fp32 copies for half/bfloat16.
    const at::Tensor grad =
        channels_last ? as_acc(view2d(grad_out + pixel * s.c_out, s.c_out, np, 1, s.c_out))
                      : as_acc(view2d(grad_out + n * s.c_out * hw + p0, s.c_out, np, hw, 1));
    const at::Tensor lat_t =
        channels_last ? as_acc(view2d(lateral + pixel * s.c_in, np, s.c_in, s.c_in, 1))
                      : as_acc(view2d(lateral + n * s.c_in * hw + p0, np, s.c_in, 1, hw));
    matmul(weight_acc, grad, lat_t, /*accumulate=*/true);
  }
}

// grad_top and grad_bias in one pass over grad_out: both read all of it, and the pass is
// memory-bound. The destination windows of the top pixels partition the output pixels, so
// grad_bias is the sum of the window sums grad_top is rounded from.
//
// For top pixel (sy, sx) the window sum, in acc precision, adds columns first:
//   S = sum over x in cols(sx), in order, of (sum over y in rows(sy), in order, of grad_out[y, x])
// (an empty range sums to 0); grad_top is S rounded once. grad_bias: per (image, top row) a
// partial in kBiasLanes interleaved lanes (S of column sx into lane sx % kBiasLanes, each lane
// in sx order, then the lanes in order), the partials added in double in (image, top row)
// order. Both layouts run the same additions in the same order (NCHW vectorizes along the
// pixels, channels_last along the channels), so both outputs have the same bits in either
// layout and for any thread count.
// grad_top's memory comes from the output cache, as out's does (a fresh 31 MB grad_top paid
// its page faults on every call). Measured on the Zen 4 EPYC (2026-12-06, both asked for, 15
// calls each, two runs) against two passes (grad_bias in chunk lanes, then grad_top with a
// scalar loop per top pixel, into a fresh tensor): R50 P2 fp32 NCHW 23.7-26.7 -> 6.1-6.8 ms,
// bf16 NCHW 19.7-25.5 -> 5.5-6.2, fp32 channels_last 9.1-10.0 -> 5.7-6.4, bf16 channels_last
// 7.3 -> 3.6-4.5; P3 bf16 NCHW 4.8-7.9 -> 1.2-2.3.
constexpr int64_t kBiasLanes = 16;

// window[sx] = the window sums of one top row from its column sums (NCHW).
template <typename acc>
void window_sums(const acc* __restrict__ colsum, const AxisTables& cols, int64_t top_w,
                 acc* __restrict__ window) {
  int64_t sx = 0;
  if (cols.kind == GatherKind::kIdentity) {
    const int64_t full = std::min<int64_t>(top_w, static_cast<int64_t>(cols.src.size()));
    for (; sx < full; ++sx) window[sx] = colsum[sx];
  } else if (cols.kind == GatherKind::kDouble) {
    const int64_t full = std::min<int64_t>(top_w, static_cast<int64_t>(cols.src.size()) / 2);
    for (; sx < full; ++sx) window[sx] = colsum[2 * sx] + colsum[2 * sx + 1];
  }
  for (; sx < top_w; ++sx) {  // the general case, and the ends of the two above
    const int64_t x0 = cols.begin[sx], x1 = cols.begin[sx + 1];
    acc sum = x0 < x1 ? colsum[x0] : acc(0);
    for (int64_t x = x0 + 1; x < x1; ++x) sum += colsum[x];
    window[sx] = sum;
  }
}

template <typename scalar_t>
void round_row(const acc_t<scalar_t>* src, scalar_t* dst, int64_t n, bool avx512) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    if (avx512) return bf16_gemm::round_to_bf16(src, dst, n);
  }
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
}

// grad_top (or null) and grad_bias (or null, accumulated in double) as described above.
template <typename scalar_t>
void grad_top_bias_kernel(const Shape& s, const scalar_t* grad_out, scalar_t* grad_top,
                          double* grad_bias, bool channels_last, const AxisTables& rows,
                          const AxisTables& cols) {
  using acc = acc_t<scalar_t>;
  const int64_t hw = s.pixels(), bands = s.n * s.top_h;
  const bool avx512 = bf16_gemm::available();  // round_to_bf16's AVX-512 loop may run
  std::vector<acc> partials(grad_bias ? bands * s.c_out : 0);  // (image, top row, channel)
  if (!channels_last) {
    parallel_tasks(s.n * s.c_out, [&](int64_t plane) {
      const int64_t n = plane / s.c_out, o = plane % s.c_out;
      const scalar_t* g = grad_out + plane * hw;
      std::vector<acc> colsum(s.w), window(s.top_w);
      for (int64_t sy = 0; sy < s.top_h; ++sy) {
        const int64_t y0 = rows.begin[sy], y1 = rows.begin[sy + 1];
        if (y0 == y1) {
          std::fill(colsum.begin(), colsum.end(), acc(0));
        } else {
          const scalar_t* __restrict__ first = g + y0 * s.w;
          acc* __restrict__ c = colsum.data();
          for (int64_t x = 0; x < s.w; ++x) c[x] = static_cast<acc>(first[x]);
          for (int64_t y = y0 + 1; y < y1; ++y) {
            const scalar_t* __restrict__ row = g + y * s.w;
            for (int64_t x = 0; x < s.w; ++x) c[x] += static_cast<acc>(row[x]);
          }
        }
        window_sums(colsum.data(), cols, s.top_w, window.data());
        if (grad_top) {
          round_row(window.data(), grad_top + (plane * s.top_h + sy) * s.top_w, s.top_w, avx512);
        }
        if (grad_bias) {
          acc lanes[kBiasLanes] = {};
          int64_t sx = 0;
          for (; sx + kBiasLanes <= s.top_w; sx += kBiasLanes)
            for (int64_t j = 0; j < kBiasLanes; ++j) lanes[j] += window[sx + j];
          for (int64_t j = 0; sx + j < s.top_w; ++j) lanes[j] += window[sx + j];
          acc sum = lanes[0];
          for (int64_t j = 1; j < kBiasLanes; ++j) sum += lanes[j];
          partials[(n * s.top_h + sy) * s.c_out + o] = sum;
        }
      }
    });
  } else {
    parallel_tasks(bands, [&](int64_t band) {
      const int64_t n = band / s.top_h, sy = band % s.top_h, c_out = s.c_out;
      const int64_t y0 = rows.begin[sy], y1 = rows.begin[sy + 1];
      const scalar_t* g = grad_out + n * hw * c_out;
      std::vector<acc> colsum(c_out), window(c_out), lanes(grad_bias ? kBiasLanes * c_out : 0);
      for (int64_t sx = 0; sx < s.top_w; ++sx) {
        acc* __restrict__ w = window.data();
        std::fill(window.begin(), window.end(), acc(0));
        for (int64_t x = cols.begin[sx]; x < cols.begin[sx + 1] && y0 < y1; ++x) {
          acc* __restrict__ c = colsum.data();
          const scalar_t* __restrict__ first = g + (y0 * s.w + x) * c_out;
          for (int64_t o = 0; o < c_out; ++o) c[o] = static_cast<acc>(first[o]);
          for (int64_t y = y0 + 1; y < y1; ++y) {
            const scalar_t* __restrict__ pixel = g + (y * s.w + x) * c_out;
            for (int64_t o = 0; o < c_out; ++o) c[o] += static_cast<acc>(pixel[o]);
          }
          if (x == cols.begin[sx]) {
            std::copy(c, c + c_out, w);
          } else {
            for (int64_t o = 0; o < c_out; ++o) w[o] += c[o];
          }
        }
        if (grad_top) {
          round_row(w, grad_top + (band * s.top_w + sx) * c_out, c_out, avx512);
        }
        if (grad_bias) {
          acc* __restrict__ lane = lanes.data() + (sx % kBiasLanes) * c_out;
          for (int64_t o = 0; o < c_out; ++o) lane[o] += w[o];
        }
      }
      if (grad_bias) {
        acc* __restrict__ partial = partials.data() + band * c_out;
        std::copy_n(lanes.data(), c_out, partial);
        for (int64_t j = 1; j < kBiasLanes; ++j)
          for (int64_t o = 0; o < c_out; ++o) partial[o] += lanes[j * c_out + o];
      }
    });
  }
  if (!grad_bias) return;
  for (int64_t band = 0; band < bands; ++band)
    for (int64_t o = 0; o < s.c_out; ++o) grad_bias[o] += partials[band * s.c_out + o];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& lateral, const at::Tensor& weight,
    at::IntArrayRef top_hw, c10::string_view mode,
    std::optional<at::ArrayRef<double>> scale_factor, bool channels_last,
    c10::string_view index_kernel, std::array<bool, 4> needs) {
  check_backward_args(grad_out, lateral, weight, top_hw, channels_last);
  const Shape s = shape_of(lateral, weight, top_hw[0], top_hw[1]);
  const auto fmt = memory_format(channels_last);
  const UpsampleGeometry g = make_geometry(s.top_h, s.top_w, s.h, s.w,
                                           std::string_view(mode.data(), mode.size()),
                                           scale_factor,
                                           std::string_view(index_kernel.data(), index_kernel.size()),
                                           lateral.scalar_type() == at::kDouble);
  const auto opts = lateral.options();
  const auto none = at::empty({0}, opts);
  at::Tensor grad_lateral = none, grad_weight = none, grad_bias = none, grad_top = none;
  if (needs[0]) {
    grad_lateral = empty_output(lateral.sizes(), lateral.scalar_type(), fmt);
  }
  if (needs[3]) {
    grad_top = empty_output({s.n, s.c_out, s.top_h, s.top_w}, lateral.scalar_type(), fmt);
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, lateral.scalar_type(),
                                  "fused_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* go = grad_out.const_data_ptr<scalar_t>();
    if (needs[0] && grad_lateral.numel() > 0) {
      grad_lateral_kernel<scalar_t>(s, go, weight, grad_lateral, channels_last);
    }
    if (needs[1]) {
      // Accumulated in acc precision, rounded to scalar_t once at the end.
      at::Tensor weight_acc =
          at::zeros({s.c_out, s.c_in}, opts.dtype(c10::CppTypeToScalarType<acc>::value));
      if (s.n * s.pixels() > 0) {
        grad_weight_kernel<scalar_t>(s, go, lateral.const_data_ptr<scalar_t>(), weight_acc,
                                     channels_last);
      }
      grad_weight = weight_acc.to(lateral.scalar_type());
    }
    if (needs[2] || needs[3]) {
      at::Tensor bias_acc = at::zeros({s.c_out}, opts.dtype(at::kDouble));  // rounded once
      if (s.n * s.c_out > 0) {
        const AxisTables rows = axis_tables(g.rows, true), cols = axis_tables(g.cols, true);
        grad_top_bias_kernel<scalar_t>(
            s, go, needs[3] ? grad_top.mutable_data_ptr<scalar_t>() : nullptr,
            needs[2] ? bias_acc.mutable_data_ptr<double>() : nullptr, channels_last, rows, cols);
      }
      if (needs[2]) grad_bias = bias_acc.to(lateral.scalar_type());
    }
  });
  return {grad_lateral, grad_weight, grad_bias, grad_top};
}

}  // namespace

TORCH_LIBRARY_IMPL(fpn_kernels, CPU, m) {
  m.impl("fused_forward", &fused_forward_cpu);
  m.impl("fused_backward", &fused_backward_cpu);
}

}  // namespace fpn_kernels
