// A 16 x 16 transpose of 32-bit words in AVX-512 registers: v[r] holds row r on entry, column
// r on return. Shared by the channels_last grad_weight operands' transposes (bf16_gemm.cpp:
// bf16 pairs as words; f32_gemm.cpp: fp32). Compiled for AVX-512 by its target attribute
// alone, so it is callable (and inlined) only from the AVX-512 regions of those files, and no
// AVX-512 code reaches a translation unit's baseline functions.
#pragma once

#if defined(__x86_64__)
#include <immintrin.h>

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

}  // namespace fpn_kernels::avx512
#endif
