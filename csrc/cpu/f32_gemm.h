// float32 GEMMs of the CPU kernels (forward and grad_lateral tiles, grad_weight panels, both
// layouts) on oneDNN's brgemm ukernel (at::native::cpublas::brgemm, f32 x f32 -> f32: the
// microkernel of the brgconv that eager's channels_last 1x1 convolution runs), on CPUs with
// AVX-512 but no AMX (Zen 4), where MKL's sgemm runs ~15% below it. Measured against MKL
// through at::mm on the same tiles, interleaved in one process (R50 levels, N = 2, 11 calls
// each, medians), channels_last forward / grad_lateral, Zen 4 EPYC (2026-12-04): P4 21.9 ->
// 20.0 / 23.3 -> 20.4 ms, P3 47.6 -> 40.7 / 46.7 -> 40.2, P2 95.3 -> 84.5 / 97.2 -> 80.3
// (grad_weight: at grad_weight_kernel_f32_brgemm). On the Sapphire Rapids Xeon (AMX) the same
// ukernel was no faster than MKL (P4 forward 22.0-25.3 against 22.6-24.0 ms, backward
// 51.7-52.1 against 47.9-48.0; 2026-12-03), so CPUs with AMX keep MKL.
// NCHW tiles (B is the tile itself, K rows an image plane apart; A the weight or its
// transpose) were once kept on MKL after the ukernel read such a B at half MKL's speed on the
// Sapphire Rapids Xeon, which keeps MKL anyway. On the Zen 4 EPYC they gain as much
// (2026-12-07, interleaved in one process, 7-9 calls each, medians, MKL -> brgemm), forward /
// grad_lateral: P4 22.7-24.7 -> 21.7-22.6 / 26.3-29.9 -> 20.3-21.1 ms, P3 46.6-50.4 ->
// 42.2-44.6 / 45.0-52.0 -> 38.6-40.8, P2 91.3-97.3 -> 85.0-87.6 / 87.6-95.7 -> 78.7-80.7.
// The NCHW grad_weight: at grad_weight_kernel_f32_brgemm_nchw.
#pragma once

#include <cstdint>

namespace fpn_kernels::f32_gemm {

// Whether these GEMMs run here: the CPU has AVX-512 and no AMX-BF16, and torch.backends.mkldnn
// is enabled.
bool available();

// 64 rows x 128 columns of c per ukernel call: with k = 1024 the block's A rows (256 KiB) stay
// in L2 while B's 128 columns stream past them (64 x 128, 128 x 64 and 64 x 256 measured alike
// on Zen 4; 64 x 128 the best of six shapes on Sapphire Rapids). A gemm() on rows [r0, r0 + m)
// and columns [c0, c0 + n) of a product, r0 a multiple of kBlockM and c0 of kBlockN, makes the
// same ukernel calls on them as the gemm() of the whole product.
constexpr int64_t kBlockM = 64;
constexpr int64_t kBlockN = 128;

// c (m x n, row stride ldc) [+]= a (m x k, row stride lda) @ b (k x n, row stride ldb), all
// fp32 row-major. Single-threaded, in fixed blocks of kBlockM x kBlockN (visited in
// for_each_block's order, block_order.h): the bits depend on the shapes alone.
void gemm(const float* a, int64_t m, int64_t k, int64_t lda, const float* b, int64_t n,
          int64_t ldb, float* c, int64_t ldc, bool accumulate);

// dst (cols x rows, row stride ld_dst) = src^T, src (rows x cols, row stride ld_src), fp32;
// single-threaded. The grad_weight's transposed operand (pixels along the reduction):
// channels_last grad_out's A, NCHW lateral's B. Only where available().
void transpose(const float* src, int64_t rows, int64_t cols, int64_t ld_src, float* dst,
               int64_t ld_dst);

}  // namespace fpn_kernels::f32_gemm
