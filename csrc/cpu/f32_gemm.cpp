#include "cpu/f32_gemm.h"

#include "cpu/avx512_transpose.h"
#include "cpu/block_order.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>

namespace fpn_kernels::f32_gemm {
namespace cpublas = at::native::cpublas;

bool available() {
#if defined(__x86_64__)
  // ATen's f32 brgemm itself runs from AVX2 on (below that it calls its BLAS); AVX-512 without
  // AMX is where it was measured faster than MKL (f32_gemm.h).
  static const bool faster_than_mkl =
      __builtin_cpu_supports("avx512f") && !__builtin_cpu_supports("amx-bf16");
  return faster_than_mkl && at::globalContext().userEnabledMkldnn();
#else
  return false;
#endif
}

void gemm(const float* a, int64_t m, int64_t k, int64_t lda, const float* b, int64_t n,
          int64_t ldb, float* c, int64_t ldc, bool accumulate) {
  const auto block = [&](int64_t i, int64_t j) {
    const int64_t r0 = i * kBlockM, c0 = j * kBlockN;
    cpublas::brgemm(std::min(kBlockM, m - r0), std::min(kBlockN, n - c0), k, lda, ldb, ldc,
                    accumulate, a + r0 * lda, b + c0, c + r0 * ldc + c0, /*is_vnni=*/false);
  };
  for_each_block(m, n, (m + kBlockM - 1) / kBlockM, (n + kBlockN - 1) / kBlockN, block);
}

#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, _mm512_undefined_epi32
// 16 x 16 blocks through registers, masked at the edges (available() implies AVX-512). ATen's
// strided copy_ did the same at ~30% of the channels_last grad_weight's GEMM time on Zen 4.
void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst,
               int64_t ld_dst) {
  avx512::transpose_words(src, rows, cols, ld_src * 4, dst, ld_dst * 4);
}
#pragma GCC diagnostic pop
#pragma GCC pop_options
#else  // no brgemm off x86-64 (available() is false)
void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst,
               int64_t ld_dst) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
}
#endif

namespace {
bool cpu_f32_brgemm() { return available(); }
}  // namespace

TORCH_LIBRARY_IMPL(fpn_kernels, CompositeImplicitAutograd, m) {
  m.impl("cpu_f32_brgemm", &cpu_f32_brgemm);
}

}  // namespace fpn_kernels::f32_gemm
