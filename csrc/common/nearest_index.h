// Nearest-neighbour source-index math shared by the CPU and CUDA kernels, bit-identical to
// ATen's aten/src/ATen/native/UpSample.h (nearest_idx / nearest_exact_idx). The Python twin is
// fpn_kernels/indexing.py (used by the Triton kernels); tests check both against ATen.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FPN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FPN_HOST_DEVICE inline
#endif

namespace fpn_kernels {

// One spatial axis of the upsample: `in_size` source pixels read by `out_size` destinations.
struct NearestAxis {
  int64_t in_size;
  int64_t out_size;
  float scale;          // source step per destination pixel, float32 as ATen computes it
  bool exact;           // "nearest-exact" (pixel centres) instead of "nearest"
  bool size_shortcuts;  // ATen's CPU kernel: out == in -> dst, out == 2*in -> dst >> 1

  // ATen's compute_scales_value<float>: 1/scale_factor (rounded once to float) when a scale
  // factor was given (> 0), else (float)in / out.
  static NearestAxis make(int64_t in_size, int64_t out_size, double scale_factor, bool exact,
                          bool size_shortcuts) {
    const float scale = scale_factor > 0.0
                            ? static_cast<float>(1.0 / scale_factor)
                            : static_cast<float>(in_size) / static_cast<float>(out_size);
    return NearestAxis{in_size, out_size, scale, exact, size_shortcuts};
  }

  FPN_HOST_DEVICE int64_t source(int64_t dst) const {
    if (!exact && size_shortcuts) {
      if (out_size == in_size) return dst;
      if (out_size == 2 * in_size) return dst >> 1;
    }
    // Float32 arithmetic exactly as ATen writes it (floorf of a float product).
    const float pos = exact ? (static_cast<float>(dst) + 0.5f) * scale
                            : static_cast<float>(dst) * scale;
    const int64_t src = static_cast<int64_t>(floorf(pos));
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
};

}  // namespace fpn_kernels
