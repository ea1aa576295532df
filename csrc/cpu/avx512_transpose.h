// A 16 x 16 transpose of 32-bit words in AVX-512 registers (v[r] holds row r on entry, column
// r on return), and a whole transpose of word matrices built on it. Shared by the channels_last
// grad_weight operands' transposes (bf16_gemm.cpp: bf16 pairs as words; f32_gemm.cpp: fp32)
// and bf16_gemm's pack of a transposed operand (bf16 pairs as words). Compiled for AVX-512 by
// their target attributes alone, so they are callable (and inlined) only from the AVX-512
// regions of those files, and no AVX-512 code reaches a translation unit's baseline functions.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>

namespace fpn_kernels::avx512 {

__attribute__((target("avx512f"))) inline void transpose16x16_words(__m512i v[16]) {
  __m512i t[16];
  // Per 128-bit lane L (columns 4L..4L+3): t[4i + m] holds column 4L + m of rows 4i..4i+3.
  for (int i = 0; i < 4; ++i) {
    const __m512i a0 = _mm512_unpacklo_epi32(v[4 * i], v[4 * i + 1]);
    const __m512i a1 = _mm512_unpackhi_epi32(v[4 * i], v[4 * i + 1]);
    const __m512i a2 = _mm512_unpacklo_epi32(v[4 * i + 2], v[4 * i + 3]);
    const __m512i a3 = _mm512_unpackhi_epi32(v[4 * i + 2], v[4 * i + 3]);
    t[4 * i] = _mm512_unpacklo_epi64(a0, a2);
    t[4 * i + 1] = _mm512_unpackhi_epi64(a0, a2);
    t[4 * i + 2] = _mm512_unpacklo_epi64(a1, a3);
    t[4 * i + 3] = _mm512_unpackhi_epi64(a1, a3);
  }
  // v[4L + m] = lane L of t[m], t[4 + m], t[8 + m], t[12 + m]: column 4L + m of all 16 rows.
  for (int m = 0; m < 4; ++m) {
    const __m512i lo01 = _mm512_shuffle_i32x4(t[m], t[4 + m], 0x44);
    const __m512i hi01 = _mm512_shuffle_i32x4(t[m], t[4 + m], 0xee);
    const __m512i lo23 = _mm512_shuffle_i32x4(t[8 + m], t[12 + m], 0x44);
    const __m512i hi23 = _mm512_shuffle_i32x4(t[8 + m], t[12 + m], 0xee);
    v[m] = _mm512_shuffle_i32x4(lo01, lo23, 0x88);
    v[4 + m] = _mm512_shuffle_i32x4(lo01, lo23, 0xdd);
    v[8 + m] = _mm512_shuffle_i32x4(hi01, hi23, 0x88);
    v[12 + m] = _mm512_shuffle_i32x4(hi01, hi23, 0xdd);
  }
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, _mm512_undefined_epi32
// dst = src^T for 32-bit words: src is rows x cols words, row r at byte r * ld_src_bytes; dst
// is cols x rows, row c at byte c * ld_dst_bytes (any alignment: the rows of bf16 pairs may
// start at odd element offsets). 16 x 16 blocks through registers, masked at the edges.
__attribute__((target("avx512f"))) inline void transpose_words(const void* src, int64_t rows,
                                                                int64_t cols, int64_t ld_src_bytes,
                                                                void* dst, int64_t ld_dst_bytes) {
  const auto first = [](int64_t count) {  // the mask of the first `count` (<= 16) lanes
    return count >= 16 ? __mmask16(0xffff) : __mmask16((1u << count) - 1);
  };
  const char* in = static_cast<const char*>(src);
  char* out = static_cast<char*>(dst);
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t block_rows = rows - r0 < 16 ? rows - r0 : 16;
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      const int64_t block_cols = cols - c0 < 16 ? cols - c0 : 16;
      __m512i v[16];
      for (int64_t r = 0; r < 16; ++r) {
        v[r] = r < block_rows ? _mm512_maskz_loadu_epi32(first(block_cols),
                                                         in + (r0 + r) * ld_src_bytes + c0 * 4)
                              : _mm512_setzero_si512();
      }
      transpose16x16_words(v);  // v[c]: column c0 + c of the block's rows
      for (int64_t c = 0; c < block_cols; ++c) {
        _mm512_mask_storeu_epi32(out + (c0 + c) * ld_dst_bytes + r0 * 4, first(block_rows),
                                 v[c]);
      }
    }
  }
}
#pragma GCC diagnostic pop

}  // namespace fpn_kernels::avx512
#endif
