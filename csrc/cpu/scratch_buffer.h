// Scratch memory of the CPU kernels that only grows: the fp32 sums of half/bfloat16 tiles, the
// transposed and packed GEMM operands (bf16_gemm::PackedB's storage). The per-tile and
// per-chunk ones are held `thread_local` where they are used, so a thread's next tiles and
// calls reuse them instead of a fresh, page-faulting buffer each time; the weight packed once
// per call (TileGemm's packed_fixed_) lives as long as the call. All of it stays outside ATen's
// allocator, so a call's only allocation in torch's memory profile is its output.
#pragma once

#include <cstdint>
#include <memory>

namespace fpn_kernels {

template <typename T>
class ScratchBuffer {
 public:
  // At least n elements, the first n uninitialized (earlier contents are lost when it grows).
  T* get(int64_t n) {
    if (capacity_ < n) {
      data_ = std::make_unique_for_overwrite<T[]>(n);
      capacity_ = n;
    }
    return data_.get();
  }
  T* data() const { return data_.get(); }

 private:
  std::unique_ptr<T[]> data_;
  int64_t capacity_ = 0;
};

}  // namespace fpn_kernels
