// The order in which a single-threaded GEMM visits its (row block, column block) ukernel calls,
// shared by the bf16 and fp32 brgemm GEMMs (bf16_gemm.cpp, f32_gemm.cpp). Every call reads and
// writes only its own block of c, so the order changes no bits, only which operand stays in
// cache: the larger operand is walked once, block by block, and each of its blocks meets every
// block of the smaller one, which stays in L2. Measured for the fp32 GEMMs on the Zen 4 EPYC
// (2026-12-07, R50 levels, N = 2, interleaved in one process, 20 calls each, medians, rows
// always first -> this order): the NCHW forward (A the weight, 256 rows; B the tile, 988
// columns) P4 20.7 -> 20.1 ms, P3 39.6 -> 38.6, P2 84.0 -> 82.1; the NCHW grad_lateral P3 38.1
// -> 37.4, P2 77.4 -> 76.1. The order changed too, and the times did not, for the fp32
// channels_last grad_lateral at P4 (988-pixel tiles against C_in = 1024 columns), the fp32
// channels_last grad_weight's 128-row tasks and the channels_last forward's 64-pixel steps.
#pragma once

#include <cstdint>

namespace fpn_kernels {

// Calls block(i, j) for every row block i < row_blocks and column block j < col_blocks; rows
// outermost where the product has at least as many rows (m) as columns (n).
template <typename Block>
void for_each_block(int64_t m, int64_t n, int64_t row_blocks, int64_t col_blocks,
                    const Block& block) {
  if (m >= n) {
    for (int64_t i = 0; i < row_blocks; ++i)
      for (int64_t j = 0; j < col_blocks; ++j) block(i, j);
  } else {
    for (int64_t j = 0; j < col_blocks; ++j)
      for (int64_t i = 0; i < row_blocks; ++i) block(i, j);
  }
}

}  // namespace fpn_kernels
