// Argument checks and upsample geometry shared by the CPU and CUDA kernels (host code only).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/OptionalArrayRef.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string_view>
#include <vector>

#include "nearest_index.h"

namespace fpn_kernels {

// Both spatial axes of one top -> lateral upsample.
struct UpsampleGeometry {
  NearestAxis rows;
  NearestAxis cols;
};

inline bool parse_mode(std::string_view mode) {
  TORCH_CHECK(mode == "nearest" || mode == "nearest-exact",
              "mode: expected 'nearest' or 'nearest-exact', got '", mode, "'");
  return mode == "nearest-exact";
}

inline IndexKernel parse_index_kernel(std::string_view name) {
  if (name == "cpu_channels_last") return IndexKernel::kCpuChannelsLast;
  if (name == "cpu_generic") return IndexKernel::kCpuGeneric;
  TORCH_CHECK(name == "cuda", "index_kernel: expected 'cpu_channels_last', 'cpu_generic' or ",
              "'cuda', got '", name, "'");
  return IndexKernel::kCuda;
}

// `float64_tensors`: the op's dtype is float64 (ATen's generic CPU kernel then uses double).
inline UpsampleGeometry make_geometry(int64_t top_h, int64_t top_w, int64_t out_h, int64_t out_w,
                                      std::string_view mode,
                                      std::optional<at::ArrayRef<double>> scale_factor,
                                      std::string_view index_kernel, bool float64_tensors) {
  const bool exact = parse_mode(mode);
  const IndexKernel kernel = parse_index_kernel(index_kernel);
  double sh = -1.0, sw = -1.0;  // <= 0: derive the scale from the sizes, like ATen
  if (scale_factor.has_value()) {
    TORCH_CHECK(scale_factor->size() == 2, "scale_factor: expected [scale_h, scale_w], got ",
                scale_factor->size(), " values");
    sh = (*scale_factor)[0];
    sw = (*scale_factor)[1];
  }
  return UpsampleGeometry{NearestAxis::make(top_h, out_h, sh, exact, kernel, float64_tensors),
                          NearestAxis::make(top_w, out_w, sw, exact, kernel, float64_tensors)};
}

// src[dst] for every destination of one axis.
inline std::vector<int64_t> source_table(const NearestAxis& axis) {
  std::vector<int64_t> table(axis.out_size);
  for (int64_t d = 0; d < axis.out_size; ++d) table[d] = axis.source(d);
  return table;
}

// begin[s] for s in [0, in_size]: source s is read by destinations [begin[s], begin[s+1]).
inline std::vector<int64_t> destination_begin_table(const NearestAxis& axis) {
  std::vector<int64_t> begin(axis.in_size + 1);
  for (int64_t s = 0; s <= axis.in_size; ++s) begin[s] = axis.first_destination(s);
  return begin;
}

inline at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// The kernels' input contract (fpn_kernels/backends.py). The Python op guarantees it; these
// checks keep a direct call of torch.ops.fpn_kernels.fused_* from reading out of bounds.
inline void check_forward_args(const at::Tensor& lateral, const at::Tensor& weight,
                               const std::optional<at::Tensor>& bias, const at::Tensor& top,
                               bool channels_last) {
  const auto fmt = memory_format(channels_last);
  TORCH_CHECK(lateral.dim() == 4, "lateral: expected a 4-D tensor, got ", lateral.dim(), "-D");
  TORCH_CHECK(top.dim() == 4, "top: expected a 4-D tensor, got ", top.dim(), "-D");
  TORCH_CHECK(weight.dim() == 2, "weight: expected a 2-D (C_out, C_in) tensor, got ",
              weight.dim(), "-D");
  TORCH_CHECK(weight.size(1) == lateral.size(1), "weight: expected C_in = ", lateral.size(1),
              ", got ", weight.size(1));
  TORCH_CHECK(top.size(0) == lateral.size(0) && top.size(1) == weight.size(0),
              "top: expected (", lateral.size(0), ", ", weight.size(0), ", h, w), got ",
              top.sizes());
  TORCH_CHECK(lateral.is_contiguous(fmt) && top.is_contiguous(fmt) && weight.is_contiguous(),
              "lateral, top: expected contiguous tensors in one memory format, weight contiguous");
  TORCH_CHECK(top.scalar_type() == lateral.scalar_type() &&
                  weight.scalar_type() == lateral.scalar_type(),
              "weight, top: expected dtype ", lateral.scalar_type());
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->is_contiguous() &&
                    bias->scalar_type() == lateral.scalar_type(),
                "bias: expected a contiguous (", weight.size(0), ",) tensor of dtype ",
                lateral.scalar_type());
  }
}

inline void check_backward_args(const at::Tensor& grad_out, const at::Tensor& lateral,
                                const at::Tensor& weight, at::IntArrayRef top_hw,
                                bool channels_last) {
  TORCH_CHECK(top_hw.size() == 2, "top_hw: expected [h, w], got ", top_hw);
  TORCH_CHECK(lateral.dim() == 4 && weight.dim() == 2 && weight.size(1) == lateral.size(1),
              "lateral, weight: expected (N, C_in, H, W) and (C_out, C_in), got ",
              lateral.sizes(), " and ", weight.sizes());
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == lateral.size(0) &&
                  grad_out.size(1) == weight.size(0) && grad_out.size(2) == lateral.size(2) &&
                  grad_out.size(3) == lateral.size(3),
              "grad_out: expected shape (", lateral.size(0), ", ", weight.size(0), ", ",
              lateral.size(2), ", ", lateral.size(3), "), got ", grad_out.sizes());
  const auto fmt = memory_format(channels_last);
  TORCH_CHECK(grad_out.is_contiguous(fmt) && lateral.is_contiguous(fmt) && weight.is_contiguous(),
              "grad_out, lateral: expected contiguous in one memory format, weight contiguous");
  TORCH_CHECK(grad_out.scalar_type() == lateral.scalar_type() &&
                  weight.scalar_type() == lateral.scalar_type(),
              "grad_out, weight: expected dtype ", lateral.scalar_type());
}

}  // namespace fpn_kernels
