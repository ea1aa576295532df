// Nearest-neighbour source-index math shared by the CPU and CUDA kernels, bit-identical to
// ATen's upsample kernels. The Python twin is fpn_kernels/indexing.py (used by the Triton
// kernels); its docstring says which ATen kernel computes what, and tests check both copies
// against ATen itself.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FPN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FPN_HOST_DEVICE inline
#endif

namespace fpn_kernels {

FPN_HOST_DEVICE float fused_multiply_add(float a, float b, float c) { return fmaf(a, b, c); }
FPN_HOST_DEVICE double fused_multiply_add(double a, double b, double c) { return fma(a, b, c); }

// Which ATen index computation to reproduce (fpn_kernels.indexing.aten_index_kernel picks it
// from the device, top's layout and the output size, as F.interpolate's dispatch does).
enum class IndexKernel : int {
  kCpuChannelsLast = 0,  // vectorized CPU kernel: float math, size short-cuts for "nearest"
  kCpuGeneric = 1,       // generic CPU kernel: opmath math (double for float64), no short-cuts
  kCuda = 2,             // CUDA kernel: float math, no short-cuts
};

// One spatial axis of the upsample: `in_size` source pixels read by `out_size` destinations.
struct NearestAxis {
  int64_t in_size;
  int64_t out_size;
  float scale;      // source step per destination pixel, float32 (compute_scales_value<float>)
  double scale_d;   // the same in double, for kCpuGeneric on float64 tensors
  bool exact;       // "nearest-exact" (pixel centres) instead of "nearest"
  IndexKernel kernel;
  bool double_math;  // kCpuGeneric on float64 tensors

  // ATen's compute_scales_value<T>: 1/scale_factor when a scale factor was given (> 0), else
  // in / out, each rounded once to T.
  static NearestAxis make(int64_t in_size, int64_t out_size, double scale_factor, bool exact,
                          IndexKernel kernel, bool float64_tensors) {
    const bool given = scale_factor > 0.0;
    const float scale = given ? static_cast<float>(1.0 / scale_factor)
                              : static_cast<float>(in_size) / static_cast<float>(out_size);
    const double scale_d = given ? 1.0 / scale_factor
                                 : static_cast<double>(in_size) / static_cast<double>(out_size);
    return NearestAxis{in_size,  out_size, scale, scale_d, exact, kernel,
                       kernel == IndexKernel::kCpuGeneric && float64_tensors};
  }

  FPN_HOST_DEVICE int64_t source(int64_t dst) const {
    int64_t src;
    if (kernel == IndexKernel::kCpuGeneric) {
      src = double_math ? generic_source<double>(dst, scale_d) : generic_source<float>(dst, scale);
    } else {
      if (kernel == IndexKernel::kCpuChannelsLast && !exact) {
        if (out_size == in_size) return dst;
        if (out_size == 2 * in_size) return dst >> 1;
      }
      // nearest_neighbor_(exact_)compute_source_index: floorf of a float32 product.
      const float pos = exact ? (static_cast<float>(dst) + 0.5f) * scale
                              : static_cast<float>(dst) * scale;
      src = static_cast<int64_t>(floorf(pos));
    }
    return src < in_size - 1 ? src : in_size - 1;
  }

  // The adjoint: the destinations that read source `s` are [first_destination(s),
  // first_destination(s + 1)), because source() is non-decreasing in dst (every step above is
  // monotone). Binary search, so the CPU and CUDA backward derive it from the same forward
  // formula; a source nobody reads gets an empty range.
  FPN_HOST_DEVICE int64_t first_destination(int64_t s) const {
    int64_t lo = 0, hi = out_size;  // answer in [0, out_size]
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo) / 2;
      if (source(mid) < s) lo = mid + 1; else hi = mid;
    }
    return lo;
  }

 private:
  // HelperInterpNearest(Exact)::compute_indices_weights in opmath T: area_pixel_compute_source
  // _index, then floorf of the value rounded to float. ATen's `scale * (dst + 0.5) - 0.5` is
  // one fused multiply-add in its AVX2/AVX-512 builds, hence the fused multiply-add.
  template <typename T>
  FPN_HOST_DEVICE static int64_t generic_source_impl(int64_t dst, T scale, bool exact) {
    if (!exact) return static_cast<int64_t>(floorf(static_cast<float>(scale * static_cast<T>(dst))));
    T real = fused_multiply_add(scale, static_cast<T>(dst) + T(0.5), T(-0.5));
    real = real < T(0) ? T(0) : real;
    return static_cast<int64_t>(floorf(static_cast<float>(real + T(0.5))));
  }
  template <typename T>
  FPN_HOST_DEVICE int64_t generic_source(int64_t dst, T s) const {
    return generic_source_impl<T>(dst, s, exact);
  }
};

}  // namespace fpn_kernels
