// Software prefetch of a row of a strided operand, for the loops whose hardware prefetchers do
// not run ahead of them on the Zen 4 EPYC: bf16_gemm's packs and transposes (rows a pixel's
// channels apart), the channels_last forward's lateral rows (asked for by the prologue, before
// the GEMM reads them) and the bf16 channels_last grad_lateral's grad_out rows (asked for by
// the previous step's rounding stores; TileGemm::step_rows in upsample_add_conv1x1_cpu.cpp).
#pragma once

#include <cstdint>

namespace fpn_kernels {

// Asks for the cache lines of [row, row + bytes) (a hint: no fault, no effect on results).
inline void prefetch_row(const void* row, int64_t bytes) {
  for (int64_t line = 0; line < bytes; line += 64) {
    __builtin_prefetch(static_cast<const char*>(row) + line);
  }
}

}  // namespace fpn_kernels
