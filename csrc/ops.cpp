// Registration only: the schemas of the fused kernels. Implementations register themselves
// per dispatch key in csrc/cpu/ and csrc/cuda/ (TORCH_LIBRARY_IMPL), like torchvision's ops.
//
// The public op torch.ops.fpn_kernels.upsample_add_conv1x1 is defined in Python
// (fpn_kernels/ops.py, a torch.library custom op with fake kernel and autograd); it calls these
// kernels with normalized inputs: lateral and top contiguous in one memory format
// (`channels_last`), weight (C_out, C_in) contiguous, bias (C_out,) or None; `index_kernel`
// names the ATen index computation to reproduce (csrc/common/nearest_index.h).
#include <torch/library.h>

TORCH_LIBRARY(fpn_kernels, m) {
  m.def(
      "fused_forward(Tensor lateral, Tensor weight, Tensor? bias, Tensor top, str mode, "
      "float[]? scale_factor, bool channels_last, str index_kernel) -> Tensor");
  m.def(
      "fused_backward(Tensor grad_out, Tensor lateral, Tensor weight, int[] top_hw, str mode, "
      "float[]? scale_factor, bool channels_last, str index_kernel, bool[4] needs) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // The CPU kernels' cache of freed output buffers (csrc/cpu/output_cache.cpp).
  m.def("set_cpu_output_cache_limit(int limit_bytes) -> int");
  m.def("cpu_output_cache_stats() -> int[]");
  // Threads at::parallel_for runs on inside the CPU kernels (csrc/cpu/parallel_threads.cpp).
  m.def("cpu_parallel_threads() -> int");
  // Which ISA the CPU kernels' bfloat16 GEMMs run on here (csrc/cpu/bf16_gemm.cpp): "amx_bf16",
  // "avx512_bf16", or "" where they multiply fp32 copies through MKL.
  m.def("cpu_bf16_gemm_isa() -> str");
  // Whether the CPU kernels' float32 channels_last GEMMs run on oneDNN's brgemm here
  // (csrc/cpu/f32_gemm.cpp) rather than MKL.
  m.def("cpu_f32_brgemm() -> bool");
}
