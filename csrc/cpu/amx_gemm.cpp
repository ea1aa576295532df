#include "cpu/amx_gemm.h"

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>

namespace fpn_kernels::amx {
namespace cpublas = at::native::cpublas;

namespace {
// Rows of `a` per ukernel call: 32 x k of A stays in L1/L2 while it meets every column block
// of B (measured on the AMX Xeon at k = 256..2048: 32 and 64 rows alike, whole 988-row tiles
// 20-25% slower).
constexpr int64_t kBlockM = 32;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
}  // namespace

// could_pack(kBFloat16) is ATen's own test for the brgemm path with packed B: the CPU has AMX
// (oneDNN also asks the kernel for the AMX tile state on first use) and mkldnn is enabled.
bool available() { return cpublas::could_pack(at::kBFloat16); }

bool usable(int64_t k) { return k > 0 && k % 2 == 0 && available(); }

c10::BFloat16* PackedB::reserve(int64_t k, int64_t n) {
  k_ = k;
  n_ = n;
  block_elems_ = k * kBlockN;  // k is even (usable()): no padding row
  const int64_t need = ceil_div(n, kBlockN) * block_elems_;
  if (capacity_ < need) {
    data_ = std::make_unique_for_overwrite<c10::BFloat16[]>(need);
    capacity_ = need;
  }
  return data_.get();
}

void PackedB::pack(const c10::BFloat16* b, int64_t k, int64_t n, int64_t ldb) {
  c10::BFloat16* out = reserve(k, n);
  at::parallel_for(0, ceil_div(n, kBlockN), 1, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      cpublas::pack(k, std::min(kBlockN, n - j * kBlockN), ldb, kBlockN, at::kBFloat16,
                    at::kBFloat16, b + j * kBlockN, out + j * block_elems_);
    }
  });
}

void PackedB::pack_transposed(const c10::BFloat16* bt, int64_t k, int64_t n, int64_t ld_bt) {
  c10::BFloat16* out = reserve(k, n);
  // The packed layout is what cpublas::pack writes (compared bit for bit on torch 2.14.1; the
  // channels_last forward packs this way and grad_lateral with cpublas::pack, so
  // tests/test_amx.py fails if a torch update changes it): column block j holds, for each row
  // pair i, its kBlockN columns as adjacent (b[2i][c], b[2i + 1][c]) pairs. In bt those pairs
  // are adjacent already, (bt[c][2i], bt[c][2i + 1]): a block is a transpose of 32-bit words.
  // Column blocks run on the intra-op threads (once per call, before the tiles).
  at::parallel_for(0, ceil_div(n, kBlockN), 1, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      // Written in order; the block's kBlockN rows of bt are read 16 pairs per cache line, so
      // the 4 KiB of lines being read stays in L1 (writing column by column took twice as
      // long for a 256 x 1024 weight).
      const c10::BFloat16* block_rows = bt + j * kBlockN * ld_bt;
      const int64_t cols = std::min(kBlockN, n - j * kBlockN);
      c10::BFloat16* block_out = out + j * block_elems_;
      for (int64_t i = 0; i < k / 2; ++i) {
        for (int64_t c = 0; c < cols; ++c) {
          std::memcpy(block_out + 2 * (i * kBlockN + c), block_rows + c * ld_bt + 2 * i,
                      2 * sizeof(c10::BFloat16));
        }
      }
    }
  });
}

// out[c][r] = in[r][c] for the columns [c0, c1) and every row (AVX-512 below).
void transpose_columns(const uint16_t* in, int64_t rows, int64_t c0, int64_t c1, int64_t ld_in,
                       uint16_t* out, int64_t ld_out);

void transpose(const c10::BFloat16* src, int64_t rows, int64_t cols, int64_t ld_src,
               c10::BFloat16* dst, int64_t ld_dst) {
  // Blocks of 32 columns (one 64-byte line of each source row) on the intra-op threads.
  constexpr int64_t kBlock = 32;
  const auto* in = reinterpret_cast<const uint16_t*>(src);
  auto* out = reinterpret_cast<uint16_t*>(dst);
  at::parallel_for(0, ceil_div(cols, kBlock), 1, [&](int64_t first, int64_t last) {
    for (int64_t cb = first; cb < last; ++cb) {
      transpose_columns(in, rows, cb * kBlock, std::min(cols, (cb + 1) * kBlock), ld_src, out,
                        ld_dst);
    }
  });
}

void gemm(const c10::BFloat16* a, int64_t m, int64_t lda, const PackedB& b, float* c,
          int64_t ldc, bool accumulate) {
  const int64_t row_blocks = ceil_div(m, kBlockM);
  const int64_t col_blocks = ceil_div(b.n(), PackedB::kBlockN);
  const auto block = [&](int64_t i, int64_t j) {
    const int64_t rows = std::min(kBlockM, m - i * kBlockM);
    const int64_t cols = std::min(PackedB::kBlockN, b.n() - j * PackedB::kBlockN);
    cpublas::brgemm(rows, cols, b.k(), lda, PackedB::kBlockN, ldc, accumulate,
                    a + i * kBlockM * lda, b.block(j), c + i * kBlockM * ldc + j * PackedB::kBlockN,
                    /*is_vnni=*/true);
  };
  // The larger operand is walked once, block by block; each of its blocks meets every block of
  // the smaller one, which stays in L2.
  if (m >= b.n()) {
    for (int64_t i = 0; i < row_blocks; ++i)
      for (int64_t j = 0; j < col_blocks; ++j) block(i, j);
  } else {
    for (int64_t j = 0; j < col_blocks; ++j)
      for (int64_t i = 0; i < row_blocks; ++i) block(i, j);
  }
  cpublas::brgemm_release(/*is_vnni=*/true);  // leave no AMX tile state to the thread
}

#if defined(__x86_64__)
// Only the functions between push_options and pop_options are compiled for AVX-512; the header
// functions they inline were defined above it, so no AVX-512 copy of them can leak into other
// translation units.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, _mm512_undefined_epi32

namespace {
// The lanes of a 16-wide step at i that are below n.
__mmask16 lanes_from(int64_t i, int64_t n) {
  return n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
}
}  // namespace

void widen_add(const c10::BFloat16* src, const float* bias, float* dst, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(src);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = lanes_from(i, n);
    // bf16 is the upper half of an fp32: widen the 16-bit words and shift them up.
    const __m512i words = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, bits + i));
    __m512 value = _mm512_castsi512_ps(_mm512_slli_epi32(words, 16));
    if (bias) value = _mm512_add_ps(_mm512_maskz_loadu_ps(lanes, bias + i), value);
    _mm512_mask_storeu_ps(dst + i, lanes, value);
  }
}

void round_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  auto* bits = reinterpret_cast<uint16_t*>(dst);
  const __m512i one = _mm512_set1_epi32(1), half_minus_one = _mm512_set1_epi32(0x7fff);
  const __m512i quiet_nan = _mm512_set1_epi32(0x7fc0);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = lanes_from(i, n);
    const __m512 value = _mm512_maskz_loadu_ps(lanes, src + i);
    const __m512i u = _mm512_castps_si512(value);
    // c10::detail::round_to_nearest_even: (u + 0x7fff + ((u >> 16) & 1)) >> 16.
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), one);
    __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half_minus_one, odd)), 16);
    rounded = _mm512_mask_mov_epi32(rounded, _mm512_cmp_ps_mask(value, value, _CMP_UNORD_Q),
                                    quiet_nan);
    _mm512_mask_cvtepi32_storeu_epi16(bits + i, lanes, rounded);
  }
}

void transpose_columns(const uint16_t* in, int64_t rows, int64_t c0, int64_t c1, int64_t ld_in,
                       uint16_t* out, int64_t ld_out) {
  // 16 rows at a time: one 32-bit gather per column pair reads (in[r][c], in[r][c + 1]) of
  // the 16 rows, whose low and high halves are out's rows c and c + 1 (16 lines of `in`, in
  // L1 while every pair of the block reads them). An element at a time this took ~40% of the
  // channels_last bf16 grad_weight at R50's P2 on the AMX Xeon.
  const __m512i row_offsets =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int>(ld_in * 2)));  // bytes
  const int64_t pairs_end = c0 + ((c1 - c0) & ~int64_t(1));
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const __mmask16 lanes = lanes_from(r0, rows);
    const uint16_t* block = in + r0 * ld_in;
    for (int64_t c = c0; c < pairs_end; c += 2) {
      const __m512i pair =
          _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), lanes, row_offsets, block + c, 1);
      _mm256_mask_storeu_epi16(out + c * ld_out + r0, lanes, _mm512_cvtepi32_epi16(pair));
      _mm256_mask_storeu_epi16(out + (c + 1) * ld_out + r0, lanes,
                               _mm512_cvtepi32_epi16(_mm512_srli_epi32(pair, 16)));
    }
    if (pairs_end < c1) {  // an odd last column
      for (int64_t r = r0; r < std::min(rows, r0 + 16); ++r) {
        out[pairs_end * ld_out + r] = in[r * ld_in + pairs_end];
      }
    }
  }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else  // no AMX off x86-64 (available() is false); plain loops keep the library whole

void widen_add(const c10::BFloat16* src, const float* bias, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = bias ? bias[i] + static_cast<float>(src[i]) : static_cast<float>(src[i]);
  }
}

void round_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

void transpose_columns(const uint16_t* in, int64_t rows, int64_t c0, int64_t c1, int64_t ld_in,
                       uint16_t* out, int64_t ld_out) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = 0; r < rows; ++r) out[c * ld_out + r] = in[r * ld_in + c];
}

#endif

namespace {
bool cpu_amx_bf16_gemm() { return available(); }
}  // namespace

TORCH_LIBRARY_IMPL(fpn_kernels, CompositeImplicitAutograd, m) {
  m.impl("cpu_amx_bf16_gemm", &cpu_amx_bf16_gemm);
}

}  // namespace fpn_kernels::amx
