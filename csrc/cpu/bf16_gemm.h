// bfloat16 GEMMs with fp32 accumulation through ATen's oneDNN brgemm ukernel
// (at::native::cpublas::brgemm, which torch's CPU flash attention uses): on AMX tiles where the
// CPU has AMX-BF16 (Sapphire Rapids and later), with AVX512-BF16's VDPBF16PS where it has that
// but no AMX (Zen 4, Cooper Lake). Without either, the CPU kernels multiply bf16 tiles as fp32
// copies with MKL: on the AMX Xeon of 2026-12-01 that ran at ~80 GFLOP/s per core against ~680
// for these GEMMs inside the forward, and on the Zen 4 EPYC of 2026-12-04 it left every
// GEMM-bound bf16 level 1.7-2.4x slower than eager's oneDNN convolution (0.95-1.04x with
// VDPBF16PS, forward, same run conditions).
#pragma once

#include "cpu/scratch_buffer.h"

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace fpn_kernels::bf16_gemm {

// The instructions these GEMMs run on here: the CPU's (AMX-BF16 first), with
// torch.backends.mkldnn enabled (the switch that also moves eager's convolutions off oneDNN);
// kNone without both.
enum class Isa { kNone, kAvx512Bf16, kAmxBf16 };
Isa isa();

// Whether these GEMMs run here with a reduction of length `k`: isa() is not kNone, and k is
// even. The ukernel multiplies bf16 in pairs along k; on torch 2.14.1 an odd k makes its
// generated code raise SIGILL on AMX, so odd reductions keep the fp32 path.
bool available();
bool usable(int64_t k);

// B (k x n, row-major, row stride ldb) in the ukernel's layout: column blocks of kBlockN, each
// k x kBlockN with pairs of rows interleaved. The buffer is reused by the next pack.
class PackedB {
 public:
  static constexpr int64_t kBlockN = 64;  // the largest packed leading dimension oneDNN takes
  // Column blocks run on the intra-op threads (serially when called inside a parallel region).
  void pack(const c10::BFloat16* b, int64_t k, int64_t n, int64_t ldb);
  // The same for B = bt^T, bt (n x k) row-major with row stride ld_bt: the weight^T operand,
  // packed straight from the weight, and the NCHW grad_weight's lateral chunks. A transpose of
  // 32-bit words (bf16 pairs) in AVX-512 registers (a 4-byte copy per pair took ~0.18 ms for a
  // 256 x 1024 weight, and ~17% of the bf16 NCHW grad_weight, on the Zen 4 EPYC).
  void pack_transposed(const c10::BFloat16* bt, int64_t k, int64_t n, int64_t ld_bt);
  int64_t k() const { return k_; }
  int64_t n() const { return n_; }
  const c10::BFloat16* block(int64_t j) const { return data_.data() + j * block_elems_; }

 private:
  c10::BFloat16* reserve(int64_t k, int64_t n);
  ScratchBuffer<c10::BFloat16> data_;
  int64_t block_elems_ = 0, k_ = 0, n_ = 0;
};

// Rows of `a` per ukernel call in gemm(): 32 x k of A stays in L1/L2 while it meets every
// column block of B (measured on the AMX Xeon at k = 256..2048: 32 and 64 rows alike, whole
// 988-row tiles 20-25% slower). A gemm() on rows [r0, r0 + m) of a product, r0 a multiple of
// kBlockM, makes the same ukernel calls on those rows as the gemm() of the whole product.
constexpr int64_t kBlockM = 32;

// c (m x b.n(), fp32, row stride ldc) = [c +] a (m x b.k(), row-major, row stride lda) @ b.
// Single-threaded and of fixed blocking: the bits depend on the shapes alone.
void gemm(const c10::BFloat16* a, int64_t m, int64_t lda, const PackedB& b, float* c,
          int64_t ldc, bool accumulate);

// dst (cols x rows, row stride ld_dst) = src^T, src (rows x cols, row stride ld_src): the
// channels_last grad_weight's A operand (grad_out^T: pixels along the reduction). On the
// intra-op threads, by blocks of dst rows.
void transpose(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld_src,
               c10::BFloat16* dst, int64_t ld_dst);

// The element loops around these GEMMs, in AVX-512 (every CPU with AMX or AVX512-BF16 has it;
// only these functions are compiled for it, so the library still loads on any x86-64):
//   widen_add:     dst[i] = bias[i] + float(src[i]), or float(src[i]) when bias is null;
//   round_to_bf16: dst[i] = src[i] rounded to nearest even, NaN to 0x7fc0: c10::BFloat16(float).
// Compiled for the SSE2 baseline they ran at about a third of the GEMM's time on the AMX Xeon.
void widen_add(const c10::BFloat16* src, const float* bias, float* dst, int64_t n);
void round_to_bf16(const float* src, c10::BFloat16* dst, int64_t n);

}  // namespace fpn_kernels::bf16_gemm
