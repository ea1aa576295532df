// Output memory for the CPU kernels, reused across calls.
#pragma once

#include <ATen/core/Tensor.h>

namespace fpn_kernels {

// An uninitialized CPU tensor (like at::empty) for an output that the kernel overwrites whole:
// the forward's `out` and the backward's `grad_lateral` and `grad_top`. Large ones come from a
// cache of freed outputs, so the steady state of a model run (same shapes every call) writes
// into memory that is already mapped; csrc/cpu/output_cache.cpp says why and what it holds.
at::Tensor empty_output(at::IntArrayRef sizes, at::ScalarType dtype,
                        at::MemoryFormat memory_format);

}  // namespace fpn_kernels
