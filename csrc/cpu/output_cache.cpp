// A cache of freed output buffers for the CPU kernels.
//
// Why: torch's CPU allocator hands every large tensor fresh pages from mmap and returns them
// with munmap when the tensor dies, so each call of a kernel pays the first-touch page faults
// of its whole output again. Measured on this project's 2-core VM: ~45 ms to fault in a 124 MB
// (R50-FPN P2) output with 4 KiB pages, ~10 ms with transparent huge pages but with stalls of
// 100-250 ms when other large tensors were freed in between (as eager's conv/upsample/add do),
// against ~110 ms for the whole P2 GEMM. A model calls the merge with the same shapes every
// step, so an output buffer freed by the last step is exactly the one the next step needs.
//
// What it holds: blocks of >= kMinCachedBytes, rounded up to 2 MiB (huge-page backed where the
// kernel allows it), that belonged to a dead output; at most `limit` bytes of them (default
// 512 MiB, FPN_KERNELS_CPU_OUTPUT_CACHE_MB, or set_cpu_output_cache_limit), the oldest freed
// first. Live outputs are never counted or limited. The outputs' storages use this allocator, so
// they resize like any CPU tensor, and the profiler sees their allocations (profile_memory).

#include "cpu/output_cache.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fpn_kernels {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
// Smaller outputs fault in few pages; torch's allocator keeps serving them.
constexpr size_t kMinCachedBytes = size_t(1) << 20;
constexpr int64_t kDefaultLimitMiB = 512;

struct Block {
  void* data;
  size_t capacity;  // a multiple of kHugePage
  size_t in_use;    // the bytes of the output it currently backs (0 while cached)
};

int64_t limit_from_env() {
  const char* text = std::getenv("FPN_KERNELS_CPU_OUTPUT_CACHE_MB");
  if (text == nullptr || *text == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  const long long mib = std::strtoll(text, &end, 10);
  TORCH_CHECK_VALUE(end != text && *end == '\0' && mib >= 0,
              "FPN_KERNELS_CPU_OUTPUT_CACHE_MB: expected a non-negative integer (MiB), got '",
              text, "'");
  return static_cast<int64_t>(mib) << 20;
}

class OutputCache final : public c10::Allocator {
 public:
  static OutputCache& instance() {
    // Never destroyed: outputs can outlive static destruction (a tensor freed at exit).
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(nbytes);
    const size_t capacity = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    Block* block = take(capacity);
    if (block == nullptr) block = fresh(capacity);
    block->in_use = nbytes;
    report(block, static_cast<int64_t>(nbytes));
    return {block->data, block, &OutputCache::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Sets the limit on cached bytes, freeing the oldest blocks above it; returns the old limit.
  int64_t set_limit(int64_t limit) {
    TORCH_CHECK_VALUE(limit >= 0, "limit_bytes: expected >= 0, got ", limit);
    std::lock_guard<std::mutex> lock(mutex_);
    const int64_t old = limit_;
    limit_ = limit;
    trim_locked(0);
    return old;
  }

  // [limit, cached bytes, cached blocks, live bytes, hits, misses]
  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {limit_, static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(free_.size()),
            static_cast<int64_t>(live_bytes_), hits_, misses_};
  }

 private:
  OutputCache() : limit_(limit_from_env()) {}

  Block* take(size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    // The most recently freed block of this size: its pages are the likeliest still in cache.
    for (auto it = free_.rbegin(); it != free_.rend(); ++it) {
      if ((*it)->capacity == capacity) {
        Block* block = *it;
        free_.erase(std::next(it).base());
        cached_bytes_ -= capacity;
        live_bytes_ += capacity;
        ++hits_;
        return block;
      }
    }
    ++misses_;
    live_bytes_ += capacity;
    return nullptr;
  }

  Block* fresh(size_t capacity) {
    void* data = nullptr;
    if (posix_memalign(&data, kHugePage, capacity) != 0) {
      {
        std::lock_guard<std::mutex> lock(mutex_);
        live_bytes_ -= capacity;
      }
      TORCH_CHECK_WITH(OutOfMemoryError, false, "fpn_kernels: CPU out of memory allocating ",
                       capacity, " bytes for an output");
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    // Advisory: 2 MiB pages make the one-time first touch ~4x cheaper here (see above).
    madvise(data, capacity, MADV_HUGEPAGE);
#endif
    return new Block{data, capacity, 0};
  }

  static void release(void* context) { instance().put(static_cast<Block*>(context)); }

  void put(Block* block) {
    report(block, -static_cast<int64_t>(block->in_use));
    block->in_use = 0;
    std::lock_guard<std::mutex> lock(mutex_);
    live_bytes_ -= block->capacity;
    if (static_cast<int64_t>(block->capacity) > limit_) {
      destroy(block);
      return;
    }
    trim_locked(block->capacity);
    free_.push_back(block);
    cached_bytes_ += block->capacity;
  }

  // Frees the oldest cached blocks until `incoming` more bytes fit under the limit.
  void trim_locked(size_t incoming) {
    while (!free_.empty() && static_cast<int64_t>(cached_bytes_ + incoming) > limit_) {
      Block* oldest = free_.front();
      free_.pop_front();
      cached_bytes_ -= oldest->capacity;
      destroy(oldest);
    }
  }

  static void destroy(Block* block) {
    std::free(block->data);
    delete block;
  }

  void report(const Block* block, int64_t delta) {
    // What the profiler shows for CPU tensors: the output's bytes, whether the block was cached.
    size_t live, cached;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live = live_bytes_;
      cached = cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(block->data, delta, live, live + cached,
                                     c10::Device(c10::kCPU));
  }

  std::mutex mutex_;
  std::deque<Block*> free_;  // oldest freed first
  size_t cached_bytes_ = 0;
  size_t live_bytes_ = 0;
  int64_t limit_;
  int64_t hits_ = 0, misses_ = 0;
};

int64_t set_cpu_output_cache_limit(int64_t limit_bytes) {
  return OutputCache::instance().set_limit(limit_bytes);
}

std::vector<int64_t> cpu_output_cache_stats() { return OutputCache::instance().stats(); }

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype,
                        at::MemoryFormat memory_format) {
  return at::detail::empty_generic(sizes, &OutputCache::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   memory_format);
}

TORCH_LIBRARY_IMPL(fpn_kernels, CompositeImplicitAutograd, m) {
  m.impl("set_cpu_output_cache_limit", &set_cpu_output_cache_limit);
  m.impl("cpu_output_cache_stats", &cpu_output_cache_stats);
}

}  // namespace fpn_kernels
