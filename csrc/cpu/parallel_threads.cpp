// How many threads at::parallel_for runs on inside this library. at::parallel_for is a header
// template: with ATen's OpenMP backend it is compiled into this library, and silently runs on
// one thread when the library is built without OpenMP (setup.py adds it). Tests and
// `python -m fpn_kernels backends` read this to check.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

namespace fpn_kernels {
namespace {

int64_t cpu_parallel_threads() {
  std::atomic<int64_t> threads{1};
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const int64_t mine = at::get_thread_num() + 1;
    int64_t seen = threads.load();
    while (mine > seen && !threads.compare_exchange_weak(seen, mine)) {
    }
  });
  return threads.load();
}

}  // namespace

TORCH_LIBRARY_IMPL(fpn_kernels, CompositeImplicitAutograd, m) {
  m.impl("cpu_parallel_threads", &cpu_parallel_threads);
}

}  // namespace fpn_kernels
