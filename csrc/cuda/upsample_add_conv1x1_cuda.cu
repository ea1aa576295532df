// Fused CUDA kernels: out = conv1x1(lateral, weight) + bias + nearest_upsample(top).
//
// Every GEMM below is one kernel, `gemm_kernel`: a batch of C = A @ B over strided matrix
// views, tiled 64 x 64 x 32 through shared memory, fp32 accumulation (tensor cores via WMMA for
// fp16/bf16 on sm_80+, and for fp32 as TF32 when eager's cuDNN conv would use TF32: the same
// ATen flag, see fp32_as_tf32(); FMA otherwise), and an epilogue that adds the bias and the nearest-gathered
// top before the single store. Image tensors are read as (channels x pixels) matrices: NCHW has
// strides (HW, 1), channels_last (1, C), so one kernel serves both layouts; the thread mapping of
// loads and stores follows whichever axis is contiguous (coalescing only, never correctness).
//
//   forward       out_n (C_out x HW)   = weight (C_out x C_in) @ lateral_n (C_in x HW)  + epilogue
//   grad_lateral  grad_lat_n (C_in x HW) = weight^T (C_in x C_out) @ grad_out_n (C_out x HW)
//   grad_weight   partial_s (C_out x C_in) = grad_out_n (C_out x P_s) @ lateral_n^T (P_s x C_in)
//                 over fixed pixel chunks s (from the shape only), then summed over s in order
//                 (grad_bias: row sums of the same grad_out tiles, same chunks, same order)
//   grad_top      for each top pixel, the ordered sum over the destination rectangle that reads it
//                 (NearestAxis::first_destination: the exact adjoint of the forward gather)
// No atomics anywhere: every output element is written by one thread, in a fixed order, so the
// backward gives the same bits on every run. Offsets are int64; tiles are walked by a grid-stride
// loop, so any size fits the grid.

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <limits>
#include <type_traits>

#include "common/op_args.h"

namespace fpn_kernels {
namespace {

// --------------------------------------------------------------------------- element types

// The CUDA-native element type of an ATen scalar type (same bits; WMMA wants the native ones).
template <typename scalar_t>
struct Native {
  using type = scalar_t;
};
template <>
struct Native<at::Half> {
  using type = __half;
};
template <>
struct Native<at::BFloat16> {
  using type = __nv_bfloat16;
};

// Explicit conversions only: torch builds with __CUDA_NO_HALF_CONVERSIONS__.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// --------------------------------------------------------------------------- views

// A batch of strided matrices: element [row][col] of matrix `batch` is at
// data[batch * batch_stride + row * row_stride + col * col_stride].
template <typename T>
struct MatrixView {
  T* data;
  int64_t batch_stride, row_stride, col_stride;

  __host__ __device__ T* at(int64_t batch, int64_t row, int64_t col) const {
    return data + batch * batch_stride + row * row_stride + col * col_stride;
  }
  MatrixView transposed() const { return {data, batch_stride, col_stride, row_stride}; }
};

// An image tensor (N, C, H, W) as N matrices of (C x HW): NCHW or channels_last.
template <typename T>
MatrixView<T> channels_by_pixels(T* data, int64_t channels, int64_t pixels, bool channels_last) {
  return channels_last ? MatrixView<T>{data, channels * pixels, 1, channels}
                       : MatrixView<T>{data, channels * pixels, pixels, 1};
}

// --------------------------------------------------------------------------- GEMM tiles

constexpr int kThreads = 256;  // 8 warps
constexpr int kBlockM = 64, kBlockN = 64, kBlockK = 32;
// Shared-memory row pitches: +8 elements keeps WMMA's 32-byte alignment and breaks bank
// conflicts of the FMA path's column reads; the fp32 accumulator tile needs a multiple of 4.
constexpr int kPitchA = kBlockK + 8, kPitchB = kBlockN + 8, kPitchC = kBlockN + 4;

template <typename T>
__host__ __device__ constexpr int shared_bytes() {
  constexpr int operands = (kBlockM * kPitchA + kBlockK * kPitchB) * int(sizeof(T));
  constexpr int accumulator = kBlockM * kPitchC * int(sizeof(float));
  return operands > accumulator ? operands : accumulator;
}

// tile[r][c] = matrix[row0 + r][col0 + c] (`origin` points at [row0][col0]), zero outside the
// rows_left x cols_left valid corner. Consecutive threads walk the matrix's contiguous axis.
template <int Rows, int Cols, int Pitch, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* origin, int64_t row_stride,
                                          int64_t col_stride, int64_t rows_left,
                                          int64_t cols_left) {
  const bool along_cols = col_stride == 1;
  for (int e = threadIdx.x; e < Rows * Cols; e += kThreads) {
    const int r = along_cols ? e / Cols : e % Rows;
    const int c = along_cols ? e % Cols : e / Rows;
    tile[r * Pitch + c] = (r < rows_left && c < cols_left)
                              ? origin[r * row_stride + c * col_stride]
                              : from_float<T>(0.0f);
  }
}

// FMA path (fp32; fp16/bf16 before sm_80). Thread (ty, tx) of a 16 x 16 grid owns rows
// ty + 16 i and columns tx + 16 j of the tile: a warp reads 16 consecutive B columns.
template <typename T>
struct FmaTile {
  float acc[4][4];

  __device__ void zero() {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;
  }
  __device__ void multiply_add(const T* a, const T* b) {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll 4
    for (int k = 0; k < kBlockK; ++k) {
      float a_col[4], b_row[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a_col[i] = to_float(a[(ty + 16 * i) * kPitchA + k]);
#pragma unroll
      for (int j = 0; j < 4; ++j) b_row[j] = to_float(b[k * kPitchB + tx + 16 * j]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a_col[i], b_row[j], acc[i][j]);
    }
  }
  __device__ void store(float* c) const {
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) c[(ty + 16 * i) * kPitchC + tx + 16 * j] = acc[i][j];
  }
};

// What WMMA multiplies a T tile as: fp16/bf16 as themselves (k = 16 per instruction), fp32 as
// TF32 (k = 8; the fragments hold fp32 that must be rounded to TF32 after loading).
template <typename T>
struct WmmaOperand {
  using type = T;
  static constexpr int k = 16;
  template <typename Fragment>
  __device__ static void round(Fragment&) {}
};
template <>
struct WmmaOperand<float> {
  using type = nvcuda::wmma::precision::tf32;
  static constexpr int k = 8;
  template <typename Fragment>
  __device__ static void round(Fragment& fragment) {
#pragma unroll
    for (int i = 0; i < fragment.num_elements; ++i) {
      fragment.x[i] = nvcuda::wmma::__float_to_tf32(fragment.x[i]);
    }
  }
};

// Tensor-core path (fp16/bf16, and fp32 as TF32; sm_80+): warp w owns rows 16 (w / 2) and
// columns 32 (w % 2) of the tile, two 16 x 16 fp32 accumulator fragments.
template <typename T>
struct TensorCoreTile {
  using Operand = WmmaOperand<T>;
  static constexpr int kStep = Operand::k;
  using Accumulator = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, kStep, float>;
  Accumulator acc[2];

  __device__ int row0() const { return 16 * (threadIdx.x / 32 / 2); }
  __device__ int col0() const { return 32 * (threadIdx.x / 32 % 2); }
  __device__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.0f);
    nvcuda::wmma::fill_fragment(acc[1], 0.0f);
  }
  __device__ void multiply_add(const T* a, const T* b) {
    using namespace nvcuda;
    using Elem = typename Operand::type;
    // Two k steps per iteration (all of fp16/bf16's): unrolling TF32's four costs a stack frame
    // at the 128 registers of two blocks per SM on sm_90.
#pragma unroll 2
    for (int k = 0; k < kBlockK; k += kStep) {
      wmma::fragment<wmma::matrix_a, 16, 16, kStep, Elem, wmma::row_major> a_frag;
      wmma::load_matrix_sync(a_frag, a + row0() * kPitchA + k, kPitchA);
      Operand::round(a_frag);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::fragment<wmma::matrix_b, 16, 16, kStep, Elem, wmma::row_major> b_frag;
        wmma::load_matrix_sync(b_frag, b + k * kPitchB + col0() + 16 * j, kPitchB);
        Operand::round(b_frag);
        wmma::mma_sync(acc[j], a_frag, b_frag, acc[j]);
      }
    }
  }
  __device__ void store(float* c) const {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      nvcuda::wmma::store_matrix_sync(c + row0() * kPitchC + col0() + 16 * j, acc[j], kPitchC,
                                      nvcuda::wmma::mem_row_major);
    }
  }
};

// The epilogue's extra terms, both optional: out[m][p] = acc + bias[m] + top[m][source(p)].
template <typename T>
struct UpsampleAdd {
  const T* bias;  // (M,) or null
  const T* top;   // (N, M, top_h, top_w) in the output's layout, or null
  int64_t top_batch_stride, top_channel_stride, top_pixel_stride;
  NearestAxis rows, cols;  // rows: top_h -> H, cols: top_w -> W (the GEMM's n = y * W + x)
};

__host__ __device__ constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct GemmShape {
  int64_t m, n, k;  // per batch: C (m x n) = A (m x k) @ B (k x n)
  int64_t batches;  // A and B advance by their batch stride
  // K is split into `chunks` ranges of k_chunk; chunk c of batch b writes C's matrix
  // b * chunks + c (the split-K partials of grad_weight; 1 chunk of k elsewhere).
  int64_t k_chunk, chunks;

  __host__ __device__ int64_t row_tiles() const { return ceil_div(m, kBlockM); }
  // At least one column tile, so grad_bias's row sums exist even when n == 0.
  __host__ __device__ int64_t column_tiles() const {
    return n > 0 ? ceil_div(n, kBlockN) : 1;
  }
  __host__ __device__ int64_t tiles() const {
    return batches * chunks * column_tiles() * row_tiles();
  }
};

// Tf32: fp32 operands on tensor cores as TF32 (instantiated for T = float only).
template <typename T, typename OutT, bool Tf32>
__global__ void __launch_bounds__(kThreads, 2)
    gemm_kernel(MatrixView<const T> a, MatrixView<const T> b, MatrixView<OutT> c, GemmShape shape,
                UpsampleAdd<T> epilogue, float* a_row_sums) {
  static_assert(!Tf32 || std::is_same_v<T, float>, "TF32 is an fp32 mode");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  using Tile = FmaTile<T>;  // no bf16 or TF32 WMMA before sm_80 (nor TF32 in cuDNN there)
#else
  using Tile =
      std::conditional_t<std::is_same_v<T, float> && !Tf32, FmaTile<T>, TensorCoreTile<T>>;
#endif
  // The operand tiles and, after the K loop, the fp32 accumulator tile share this buffer.
  __shared__ __align__(128) unsigned char shared[shared_bytes<T>()];
  __shared__ int64_t top_pixel[kBlockN];  // top's pixel index for each column of the tile
  T* a_tile = reinterpret_cast<T*>(shared);
  T* b_tile = a_tile + kBlockM * kPitchA;
  float* c_tile = reinterpret_cast<float*>(shared);

  const int64_t m_tiles = shape.row_tiles(), n_tiles = shape.column_tiles();
  for (int64_t tile = blockIdx.x; tile < shape.tiles(); tile += gridDim.x) {
    // Row tiles vary fastest: neighbouring blocks read the same B tile (the big operand) via L2.
    const int64_t m0 = tile % m_tiles * kBlockM;
    const int64_t n0 = tile / m_tiles % n_tiles * kBlockN;
    const int64_t chunk = tile / (m_tiles * n_tiles) % shape.chunks;
    const int64_t batch = tile / (m_tiles * n_tiles * shape.chunks);
    const int64_t k_begin = chunk * shape.k_chunk;
    const int64_t k_end = k_begin + shape.k_chunk < shape.k ? k_begin + shape.k_chunk : shape.k;
    const bool sums_rows = a_row_sums != nullptr && n0 == 0 && threadIdx.x < kBlockM;

    Tile acc;
    acc.zero();
    float row_sum = 0.0f;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kBlockK) {
      load_tile<kBlockM, kBlockK, kPitchA>(a_tile, a.at(batch, m0, k0), a.row_stride,
                                           a.col_stride, shape.m - m0, k_end - k0);
      load_tile<kBlockK, kBlockN, kPitchB>(b_tile, b.at(batch, k0, n0), b.row_stride,
                                           b.col_stride, k_end - k0, shape.n - n0);
      __syncthreads();
      acc.multiply_add(a_tile, b_tile);
      if (sums_rows) {
        for (int k = 0; k < kBlockK; ++k) row_sum += to_float(a_tile[threadIdx.x * kPitchA + k]);
      }
      __syncthreads();
    }
    acc.store(c_tile);  // the operand tiles are dead: the loop ended with a barrier
    const int64_t out_batch = batch * shape.chunks + chunk;
    if (sums_rows && m0 + threadIdx.x < shape.m) {
      a_row_sums[out_batch * shape.m + m0 + threadIdx.x] = row_sum;
    }
    if (epilogue.top != nullptr && threadIdx.x < kBlockN) {
      const int64_t pixel = n0 + threadIdx.x;
      const int64_t y = pixel / epilogue.cols.out_size, x = pixel % epilogue.cols.out_size;
      if (pixel < shape.n) {
        top_pixel[threadIdx.x] =
            epilogue.rows.source(y) * epilogue.cols.in_size + epilogue.cols.source(x);
      }
    }
    __syncthreads();

    // One store per output element, consecutive threads along C's contiguous axis.
    const bool along_cols = c.col_stride == 1;
    for (int e = threadIdx.x; e < kBlockM * kBlockN; e += kThreads) {
      const int r = along_cols ? e / kBlockN : e % kBlockM;
      const int col = along_cols ? e % kBlockN : e / kBlockM;
      const int64_t m = m0 + r, n = n0 + col;
      if (m >= shape.m || n >= shape.n) continue;
      float value = c_tile[r * kPitchC + col];
      if (epilogue.bias != nullptr) value += to_float(epilogue.bias[m]);
      if (epilogue.top != nullptr) {
        value += to_float(epilogue.top[batch * epilogue.top_batch_stride +
                                       m * epilogue.top_channel_stride +
                                       top_pixel[col] * epilogue.top_pixel_stride]);
      }
      *c.at(out_batch, m, n) = from_float<OutT>(value);
    }
    __syncthreads();  // the next tile overwrites the shared tiles
  }
}

// --------------------------------------------------------------------------- backward helpers

// out[i] = sum over s = 0, 1, ... of partial[s * size + i]: the split-K reduction, in order.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    sum_chunks_kernel(const float* partial, int64_t chunks, int64_t size, T* out) {
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < size;
       i += int64_t(gridDim.x) * kThreads) {
    float sum = 0.0f;
    for (int64_t s = 0; s < chunks; ++s) sum += partial[s * size + i];
    out[i] = from_float<T>(sum);
  }
}

// Offset of element (n, channel, pixel) of an (N, C, HW) image tensor.
__device__ __forceinline__ int64_t image_offset(int64_t n, int64_t channel, int64_t pixel,
                                                int64_t channels, int64_t pixels,
                                                bool channels_last) {
  return channels_last ? (n * pixels + pixel) * channels + channel
                       : (n * channels + channel) * pixels + pixel;
}

// grad_top[n, o, sy, sx] = sum of grad_out[n, o, y, x] over the rows and columns that read
// (sy, sx), rows first then columns, in fp32. Thread i owns grad_top's i-th element in memory.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_top_kernel(const T* grad_out, T* grad_top, int64_t batch, int64_t channels,
                    NearestAxis rows, NearestAxis cols, bool channels_last) {
  const int64_t top_pixels = rows.in_size * cols.in_size, pixels = rows.out_size * cols.out_size;
  const int64_t total = batch * channels * top_pixels;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t channel = channels_last ? i % channels : i / top_pixels % channels;
    const int64_t top_pixel = channels_last ? i / channels % top_pixels : i % top_pixels;
    const int64_t n = i / (channels * top_pixels);
    const int64_t sy = top_pixel / cols.in_size, sx = top_pixel % cols.in_size;
    const int64_t y_end = rows.first_destination(sy + 1), x_begin = cols.first_destination(sx);
    const int64_t x_end = cols.first_destination(sx + 1);
    float sum = 0.0f;
    for (int64_t y = rows.first_destination(sy); y < y_end; ++y) {
      for (int64_t x = x_begin; x < x_end; ++x) {
        sum += to_float(grad_out[image_offset(n, channel, y * cols.out_size + x, channels, pixels,
                                              channels_last)]);
      }
    }
    grad_top[i] = from_float<T>(sum);
  }
}

// --------------------------------------------------------------------------- host side

// Pixels per grad_weight chunk: a function of the shape only (so the bits never depend on the
// device), at least kMinChunkPixels, and about kTargetChunks chunks in all (enough blocks to
// fill a GPU; the fp32 partials cost chunks x C_out x C_in x 4 bytes).
constexpr int64_t kMinChunkPixels = 1024, kTargetChunks = 64;

int64_t chunk_pixels(int64_t batch, int64_t pixels) {
  const int64_t chunk = std::max(kMinChunkPixels, ceil_div(batch * pixels, kTargetChunks));
  return ceil_div(chunk, kBlockK) * kBlockK;
}

unsigned grid_size(int64_t blocks) {
  return static_cast<unsigned>(std::min<int64_t>(blocks, std::numeric_limits<int32_t>::max()));
}

// fp32 GEMMs run as TF32 exactly when eager's conv2d would: ATen's allowTF32CuDNN("conv"), the
// flag cuDNN's convolutions read (torch.backends.cudnn.allow_tf32 and the fp32_precision
// settings; fpn_kernels/precision.py is its Python twin, which the Triton backend follows).
// Read at each call, like cuDNN does; the backward's GEMMs follow it too, as eager's do.
bool fp32_as_tf32() { return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV); }

template <typename T, typename OutT>
void launch_gemm(MatrixView<const T> a, MatrixView<const T> b, MatrixView<OutT> c,
                 const GemmShape& shape, const UpsampleAdd<T>& epilogue, float* a_row_sums) {
  if (shape.tiles() == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto launch = [&](auto kernel) {
    kernel<<<grid_size(shape.tiles()), kThreads, 0, stream>>>(a, b, c, shape, epilogue,
                                                             a_row_sums);
  };
  if constexpr (std::is_same_v<T, float>) {
    if (fp32_as_tf32()) {
      launch(gemm_kernel<T, OutT, true>);
    } else {
      launch(gemm_kernel<T, OutT, false>);
    }
  } else {
    launch(gemm_kernel<T, OutT, false>);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mutable_data_of(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

// fp32, fp16, bf16 (backends.py's list for "cuda"); T is the CUDA-native element type.
#define FPN_DISPATCH_CUDA_FLOAT_TYPES(TYPE, NAME, ...)                                   \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)              \
                                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)           \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

void check_cuda_tensors(std::initializer_list<const at::Tensor*> tensors) {
  const at::Tensor& first = **tensors.begin();
  for (const at::Tensor* t : tensors) {
    TORCH_CHECK(t->is_cuda() && t->device() == first.device(),
                "fpn_kernels (cuda): expected every tensor on ", first.device(), ", got one on ",
                t->device());
  }
  const auto type = first.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16,
              "fpn_kernels (cuda): expected float32, float16 or bfloat16 tensors, got ", type);
}

at::Tensor fused_forward_cuda(const at::Tensor& lateral, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& top,
                              c10::string_view mode,
                              std::optional<at::ArrayRef<double>> scale_factor,
                              bool channels_last, c10::string_view index_kernel) {
  check_forward_args(lateral, weight, bias, top, channels_last);
  check_cuda_tensors({&lateral, &weight, &top});
  if (bias.has_value()) check_cuda_tensors({&lateral, &*bias});
  const c10::cuda::CUDAGuard device_guard(lateral.device());
  const int64_t batch = lateral.size(0), c_in = lateral.size(1), c_out = weight.size(0);
  const int64_t pixels = lateral.size(2) * lateral.size(3), top_pixels = top.size(2) * top.size(3);
  const UpsampleGeometry geometry =
      make_geometry(top.size(2), top.size(3), lateral.size(2), lateral.size(3),
                    std::string_view(mode.data(), mode.size()), scale_factor,
                    std::string_view(index_kernel.data(), index_kernel.size()),
                    /*float64_tensors=*/false);
  at::Tensor out = at::empty({batch, c_out, lateral.size(2), lateral.size(3)},
                             lateral.options().memory_format(memory_format(channels_last)));
  if (out.numel() == 0) return out;
  TORCH_CHECK(top_pixels > 0, "top: cannot upsample an empty ", top.sizes(), " map to (",
              lateral.size(2), ", ", lateral.size(3), ")");
  FPN_DISPATCH_CUDA_FLOAT_TYPES(lateral.scalar_type(), "fused_forward_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    const MatrixView<const T> top_view =
        channels_by_pixels(data_of<T>(top), c_out, top_pixels, channels_last);
    const UpsampleAdd<T> epilogue{bias.has_value() ? data_of<T>(*bias) : nullptr,
                                  data_of<T>(top),
                                  top_view.batch_stride,
                                  top_view.row_stride,
                                  top_view.col_stride,
                                  geometry.rows,
                                  geometry.cols};
    launch_gemm<T, T>(MatrixView<const T>{data_of<T>(weight), 0, c_in, 1},
                      channels_by_pixels(data_of<T>(lateral), c_in, pixels, channels_last),
                      channels_by_pixels(mutable_data_of<T>(out), c_out, pixels, channels_last),
                      GemmShape{c_out, pixels, c_in, batch, c_in, 1}, epilogue, nullptr);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& lateral, const at::Tensor& weight,
    at::IntArrayRef top_hw, c10::string_view mode,
    std::optional<at::ArrayRef<double>> scale_factor, bool channels_last,
    c10::string_view index_kernel, std::array<bool, 4> needs) {
  check_backward_args(grad_out, lateral, weight, top_hw, channels_last);
  const int64_t batch = lateral.size(0), c_in = lateral.size(1), c_out = weight.size(0);
  const int64_t pixels = lateral.size(2) * lateral.size(3);
  const auto fmt = memory_format(channels_last);
  check_cuda_tensors({&lateral, &weight, &grad_out});
  const c10::cuda::CUDAGuard device_guard(lateral.device());
  const UpsampleGeometry geometry =
      make_geometry(top_hw[0], top_hw[1], lateral.size(2), lateral.size(3),
                    std::string_view(mode.data(), mode.size()), scale_factor,
                    std::string_view(index_kernel.data(), index_kernel.size()),
                    /*float64_tensors=*/false);
  const auto opts = lateral.options();
  at::Tensor grad_lateral = at::empty({0}, opts), grad_weight = at::empty({0}, opts);
  at::Tensor grad_bias = at::empty({0}, opts), grad_top = at::empty({0}, opts);
  if (needs[0]) grad_lateral = at::empty(lateral.sizes(), opts.memory_format(fmt));
  if (needs[1]) grad_weight = at::empty({c_out, c_in}, opts);
  if (needs[2]) grad_bias = at::empty({c_out}, opts);
  if (needs[3]) grad_top = at::empty({batch, c_out, top_hw[0], top_hw[1]}, opts.memory_format(fmt));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  FPN_DISPATCH_CUDA_FLOAT_TYPES(lateral.scalar_type(), "fused_backward_cuda", [&] {
    using T = typename Native<scalar_t>::type;
    const UpsampleAdd<T> no_epilogue{nullptr, nullptr, 0, 0, 0, geometry.rows, geometry.cols};
    const auto grad_view = channels_by_pixels(data_of<T>(grad_out), c_out, pixels, channels_last);
    const auto lateral_view =
        channels_by_pixels(data_of<T>(lateral), c_in, pixels, channels_last);
    if (needs[0] && grad_lateral.numel() > 0) {
      launch_gemm<T, T>(
          MatrixView<const T>{data_of<T>(weight), 0, 1, c_in},  // weight^T (C_in x C_out)
          grad_view,
          channels_by_pixels(mutable_data_of<T>(grad_lateral), c_in, pixels, channels_last),
          GemmShape{c_in, pixels, c_out, batch, c_out, 1}, no_epilogue, nullptr);
    }
    if (needs[1] || needs[2]) {
      const int64_t k_chunk = chunk_pixels(batch, pixels);
      const int64_t chunks = ceil_div(pixels, k_chunk);
      const int64_t partials = batch * chunks;
      const auto f32 = opts.dtype(at::kFloat);
      at::Tensor weight_partial = at::empty({partials, c_out, c_in}, f32);
      at::Tensor bias_partial = at::empty({needs[2] ? partials : 0, c_out}, f32);
      launch_gemm<T, float>(
          grad_view, lateral_view.transposed(),
          MatrixView<float>{weight_partial.mutable_data_ptr<float>(), c_out * c_in, c_in, 1},
          GemmShape{c_out, c_in, pixels, batch, k_chunk, chunks}, no_epilogue,
          needs[2] ? bias_partial.mutable_data_ptr<float>() : nullptr);
      const auto reduce = [&](const at::Tensor& partial, at::Tensor& out) {
        if (out.numel() == 0) return;
        sum_chunks_kernel<T><<<grid_size(ceil_div(out.numel(), kThreads)), kThreads, 0,
                               stream>>>(partial.const_data_ptr<float>(), partials, out.numel(),
                                         mutable_data_of<T>(out));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (needs[1]) reduce(weight_partial, grad_weight);
      if (needs[2]) reduce(bias_partial, grad_bias);
    }
    if (needs[3] && grad_top.numel() > 0) {
      grad_top_kernel<T><<<grid_size(ceil_div(grad_top.numel(), kThreads)), kThreads, 0,
                           stream>>>(data_of<T>(grad_out), mutable_data_of<T>(grad_top), batch,
                                     c_out, geometry.rows, geometry.cols, channels_last);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_lateral, grad_weight, grad_bias, grad_top};
}

}  // namespace

TORCH_LIBRARY_IMPL(fpn_kernels, CUDA, m) {
  m.impl("fused_forward", &fused_forward_cuda);
  m.impl("fused_backward", &fused_backward_cuda);
}

// The fp32 rule as this library applies it, callable without a GPU (tests/test_precision.py
// checks it against fpn_kernels.precision for every flag setting).
TORCH_LIBRARY_FRAGMENT(fpn_kernels, m) { m.def("cuda_fp32_as_tf32() -> bool", &fp32_as_tf32); }

}  // namespace fpn_kernels
