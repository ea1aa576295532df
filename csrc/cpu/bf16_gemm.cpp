#include "cpu/bf16_gemm.h"

#include "cpu/avx512_transpose.h"
#include "cpu/block_order.h"
#include "cpu/prefetch.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <string>
#include <vector>

namespace fpn_kernels::bf16_gemm {
namespace cpublas = at::native::cpublas;

namespace {
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The packs and transposes below read rows of a strided operand (a pixel's channels, 0.5-2 KiB
// apart) a few cache lines per row; asking for the rows kPrefetchRows ahead took the
// channels_last grad_weight from 52.1 to 45.2 ms at R50's P2 and from 24.9 to 22.2 ms at P3
// on the Zen 4 EPYC (2026-12-06, interleaved, 21 calls each; the pack's prefetch alone 48.8
// and 23.2), whose prefetchers did not follow these strides. Same bits.
constexpr int64_t kPrefetchRows = 16;
}  // namespace

namespace {
// Whether ATen's brgemm multiplies packed bf16 here: it throws where torch was built without
// oneDNN's ukernel or oneDNN's ISA is capped below avx512_core; so one small product, checked.
bool brgemm_multiplies_bf16() {
  constexpr int64_t kM = 2, kN = 16, kK = 32;
  std::vector<c10::BFloat16> a(kM * kK, c10::BFloat16(1.0f)), b(kK * PackedB::kBlockN);
  for (int64_t i = 0; i < kK / 2; ++i) {
    for (int64_t c = 0; c < kN; ++c) {  // b[k][c] = c + k % 4, pairs of rows interleaved
      b[2 * (i * PackedB::kBlockN + c)] = c10::BFloat16(float(c + (2 * i) % 4));
      b[2 * (i * PackedB::kBlockN + c) + 1] = c10::BFloat16(float(c + (2 * i + 1) % 4));
    }
  }
  std::vector<float> c(kM * kN, -1.0f);
  try {
    cpublas::brgemm(kM, kN, kK, kK, PackedB::kBlockN, kN, /*add_C=*/false, a.data(), b.data(),
                    c.data(), /*is_vnni=*/true);
    cpublas::brgemm_release(/*is_vnni=*/true);
  } catch (const c10::Error&) {
    return false;
  }
  for (int64_t i = 0; i < kM * kN; ++i) {
    if (c[i] != float(kK * (i % kN) + 48)) return false;  // sum over k of (c + k % 4)
  }
  return true;
}
}  // namespace

// could_pack(kBFloat16) is ATen's own test for AMX: the CPU has it (oneDNN also asks the kernel
// for the AMX tile state on first use) and mkldnn is enabled. Without AMX, ATen's brgemm still
// takes bf16 from avx512_core on (Brgemm::device_check), and oneDNN's ukernel generates
// AVX512-BF16 (VDPBF16PS) code where the CPU has it, for the same packed-B layout; used where a
// first product comes out right.
Isa isa() {
  if (!at::globalContext().userEnabledMkldnn()) return Isa::kNone;  // ATen's brgemm refuses then
  if (cpublas::could_pack(at::kBFloat16)) return Isa::kAmxBf16;
  static const bool avx512_bf16 = __builtin_cpu_supports("avx512bf16") &&
                                  __builtin_cpu_supports("avx512bw") && brgemm_multiplies_bf16();
  return avx512_bf16 ? Isa::kAvx512Bf16 : Isa::kNone;
}

bool available() { return isa() != Isa::kNone; }

bool usable(int64_t k) { return k > 0 && k % 2 == 0 && available(); }

// out[2c] = even[c], out[2c + 1] = odd[c] for c < cols (AVX-512 below).
void interleave_rows(const uint16_t* even, const uint16_t* odd, int64_t cols, uint16_t* out);

// Pair i of out's row p (row stride ld_out) = pair p of in's row i (row stride ld_in), for
// `rows` rows of `pairs` pairs of 16-bit words: a transpose of 32-bit words (AVX-512 below).
void transpose_pairs(const uint16_t* in, int64_t rows, int64_t pairs, int64_t ld_in,
                     uint16_t* out, int64_t ld_out);

c10::BFloat16* PackedB::reserve(int64_t k, int64_t n) {
  k_ = k;
  n_ = n;
  block_elems_ = k * kBlockN;  // k is even (usable()): no padding row
  return data_.get(ceil_div(n, kBlockN) * block_elems_);
}

void PackedB::pack(const c10::BFloat16* b, int64_t k, int64_t n, int64_t ldb) {
  c10::BFloat16* out = reserve(k, n);
  const bool onednn_packs = cpublas::could_pack(at::kBFloat16);
  at::parallel_for(0, ceil_div(n, kBlockN), 1, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      const int64_t cols = std::min(kBlockN, n - j * kBlockN);
      if (onednn_packs) {
        cpublas::pack(k, cols, ldb, kBlockN, at::kBFloat16, at::kBFloat16, b + j * kBlockN,
                      out + j * block_elems_);
        continue;
      }
      // oneDNN's transform packs bfloat16 only where the CPU has AMX; the layout is the same
      // without it (VDPBF16PS multiplies the same pairs), written here in AVX-512 (the scalar
      // loop, which GCC leaves unvectorized, took ~40% of the channels_last grad_weight's
      // time on the Zen 4 EPYC).
      const auto* block_in = reinterpret_cast<const uint16_t*>(b + j * kBlockN);
      auto* block_out = reinterpret_cast<uint16_t*>(out + j * block_elems_);
      for (int64_t i = 0; i < k / 2; ++i) {
        for (int64_t r = 2 * i + kPrefetchRows; r < std::min(k, 2 * i + kPrefetchRows + 2); ++r) {
          prefetch_row(block_in + r * ldb, cols * 2);
        }
        interleave_rows(block_in + 2 * i * ldb, block_in + (2 * i + 1) * ldb, cols,
                        block_out + 2 * i * kBlockN);
      }
    }
  });
}

void PackedB::pack_transposed(const c10::BFloat16* bt, int64_t k, int64_t n, int64_t ld_bt) {
  c10::BFloat16* out = reserve(k, n);
  // The packed layout is what cpublas::pack writes (compared bit for bit on torch 2.14.1; the
  // channels_last forward packs this way and grad_lateral with cpublas::pack, so
  // tests/test_bf16_gemm.py fails if a torch update changes it): column block j holds, for each row
  // pair i, its kBlockN columns as adjacent (b[2i][c], b[2i + 1][c]) pairs. In bt those pairs
  // are adjacent already, (bt[c][2i], bt[c][2i + 1]): a block is a transpose of 32-bit words.
  // Column blocks run on the intra-op threads (once per call, before the tiles).
  at::parallel_for(0, ceil_div(n, kBlockN), 1, [&](int64_t first, int64_t last) {
    for (int64_t j = first; j < last; ++j) {
      const int64_t cols = std::min(kBlockN, n - j * kBlockN);
      transpose_pairs(reinterpret_cast<const uint16_t*>(bt + j * kBlockN * ld_bt), cols, k / 2,
                      ld_bt, reinterpret_cast<uint16_t*>(out + j * block_elems_), 2 * kBlockN);
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
  for_each_block(m, b.n(), row_blocks, col_blocks, block);
  // Leave no AMX tile state to the thread (a no-op without AMX).
  cpublas::brgemm_release(/*is_vnni=*/true);
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

// The mask of the first `count` 16-bit words of a 32-word step (none for count <= 0).
__mmask32 first_words(int64_t count) {
  return count >= 32 ? ~__mmask32(0) : count <= 0 ? __mmask32(0) : (__mmask32(1) << count) - 1;
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

void interleave_rows(const uint16_t* even, const uint16_t* odd, int64_t cols, uint16_t* out) {
  // Word i of a 32-word output step takes even[i / 2] (i even) or odd[i / 2] (i odd): `low`
  // indexes the step's first 16 columns (odd's words from 32 on), `high` the next 16.
  alignas(64) static constexpr uint16_t kLow[32] = {0,  32, 1,  33, 2,  34, 3,  35, 4,  36, 5,
                                                    37, 6,  38, 7,  39, 8,  40, 9,  41, 10, 42,
                                                    11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i low = _mm512_load_si512(kLow);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int64_t c = 0; c < cols; c += 32) {
    const int64_t n = std::min<int64_t>(32, cols - c);
    const __m512i e = _mm512_maskz_loadu_epi16(first_words(n), even + c);
    const __m512i o = _mm512_maskz_loadu_epi16(first_words(n), odd + c);
    _mm512_mask_storeu_epi16(out + 2 * c, first_words(2 * n),
                             _mm512_permutex2var_epi16(e, low, o));
    _mm512_mask_storeu_epi16(out + 2 * c + 32, first_words(2 * n - 32),
                             _mm512_permutex2var_epi16(e, high, o));
  }
}

void transpose_pairs(const uint16_t* in, int64_t rows, int64_t pairs, int64_t ld_in,
                     uint16_t* out, int64_t ld_out) {
  avx512::transpose_words(in, rows, pairs, ld_in * 2, out, ld_out * 2);
}

void transpose_columns(const uint16_t* in, int64_t rows, int64_t c0, int64_t c1, int64_t ld_in,
                       uint16_t* out, int64_t ld_out) {
  // 16 rows x 32 columns at a time: the rows' 16 column pairs are 16 x 16 32-bit words,
  // transposed in registers (unpacks, then 128-bit lane shuffles); word j of row r is then
  // (in[r][c + 2j], in[r][c + 2j + 1]), whose low and high halves go to out's rows c + 2j and
  // c + 2j + 1. One 32-bit gather per column pair did the same at ~1/3 of the channels_last
  // grad_weight's GEMM time on the Zen 4 EPYC (its gathers are microcoded).
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t block_rows = std::min<int64_t>(16, rows - r0);
    const __mmask16 row_lanes = lanes_from(r0, rows);
    for (int64_t c = c0; c < c1; c += 32) {
      const int64_t cols = std::min<int64_t>(32, c1 - c);
      for (int64_t r = r0 + 16; r < std::min(rows, r0 + 32); ++r) {  // the next 16 rows
        prefetch_row(in + r * ld_in + c, cols * 2);
      }
      __m512i v[16];
      for (int64_t r = 0; r < 16; ++r) {
        v[r] = r < block_rows
                   ? _mm512_maskz_loadu_epi16(first_words(cols), in + (r0 + r) * ld_in + c)
                   : _mm512_setzero_si512();
      }
      avx512::transpose16x16_words(v);  // v[j]: pair j of the 16 rows
      for (int64_t j = 0; 2 * j < cols; ++j) {
        uint16_t* even_row = out + (c + 2 * j) * ld_out + r0;
        _mm256_mask_storeu_epi16(even_row, row_lanes, _mm512_cvtepi32_epi16(v[j]));
        if (2 * j + 1 < cols) {
          _mm256_mask_storeu_epi16(even_row + ld_out, row_lanes,
                                   _mm512_cvtepi32_epi16(_mm512_srli_epi32(v[j], 16)));
        }
      }
    }
  }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else  // no brgemm off x86-64 (available() is false); plain loops keep the library whole

void widen_add(const c10::BFloat16* src, const float* bias, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dst[i] = bias ? bias[i] + static_cast<float>(src[i]) : static_cast<float>(src[i]);
  }
}

void round_to_bf16(const float* src, c10::BFloat16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::BFloat16(src[i]);
}

void interleave_rows(const uint16_t* even, const uint16_t* odd, int64_t cols, uint16_t* out) {
  for (int64_t c = 0; c < cols; ++c) {
    out[2 * c] = even[c];
    out[2 * c + 1] = odd[c];
  }
}

void transpose_pairs(const uint16_t* in, int64_t rows, int64_t pairs, int64_t ld_in,
                     uint16_t* out, int64_t ld_out) {
  for (int64_t p = 0; p < pairs; ++p) {
    for (int64_t r = 0; r < rows; ++r) {
      out[p * ld_out + 2 * r] = in[r * ld_in + 2 * p];
      out[p * ld_out + 2 * r + 1] = in[r * ld_in + 2 * p + 1];
    }
  }
}

void transpose_columns(const uint16_t* in, int64_t rows, int64_t c0, int64_t c1, int64_t ld_in,
                       uint16_t* out, int64_t ld_out) {
  for (int64_t c = c0; c < c1; ++c)
    for (int64_t r = 0; r < rows; ++r) out[c * ld_out + r] = in[r * ld_in + c];
}

#endif

namespace {
std::string cpu_bf16_gemm_isa() {
  switch (isa()) {
    case Isa::kAmxBf16: return "amx_bf16";
    case Isa::kAvx512Bf16: return "avx512_bf16";
    case Isa::kNone: break;
  }
  return "";
}
}  // namespace

TORCH_LIBRARY_IMPL(fpn_kernels, CompositeImplicitAutograd, m) {
  m.impl("cpu_bf16_gemm_isa", &cpu_bf16_gemm_isa);
}

}  // namespace fpn_kernels::bf16_gemm
