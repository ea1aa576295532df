"""The "cpu" backend: the fused C++ kernels in csrc/cpu (torch.ops.fpn_kernels.fused_*)."""

from __future__ import annotations

import torch

from . import _cpp


def unavailable_reason() -> str | None:
    return _cpp.load("_C")


# backend="auto" leaves a merge to eager where eager's oneDNN convolution has native bfloat16
# GEMMs and this kernel does not, on GEMM-bound levels (C_in >= 512: R50's P4, P3). Measured,
# forward, cpu / eager time in one interleaved `bench` run each:
# * Zen 4 EPYC (AVX512-BF16, no AMX; 2026-12-02): bf16 NCHW P4 2.1x, P3 1.25x slower; channels_last
#   P4 2.6x, P3 2.3x slower; P2 (C_in 256) 1.5x / 1.2x faster, so it stays on this kernel.
# * Sapphire Rapids (AMX) runs this kernel's bf16 GEMMs on AMX in both layouts, grad_weight
#   included since 2026-12-03, and no case is left to eager there: in the full-matrix run of
#   2026-12-03 (benchmarks/results/bench-cpu-spr-matrix.json) the kernel is faster than the
#   eager backend (what "auto" runs instead) at every level, channels_last P4 / P3 forward
#   4.2 / 10.6 ms against 4.5 / 14.5 ms, forward+backward 20.5 / 40.4 against 30.1 / 93.4; the
#   rule that left bf16 channels_last P4/P3 to eager there made "auto" 1.09x slower forward
#   and 1.32x slower forward+backward over the three levels in that run.
# An explicit backend="cpu" still runs them. The rule reads the ISA, never a timing.
GEMM_BOUND_C_IN = 512


def _amx_bf16() -> bool:
    """Whether the kernels' bfloat16 GEMMs run on AMX tiles now (AMX-BF16 and oneDNN on)."""
    return bool(torch.ops.fpn_kernels.cpu_amx_bf16_gemm())


def _has_avx512_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def auto_declines(dtype: torch.dtype, channels_last: bool, c_in: int | None) -> str | None:
    """Why ``backend="auto"`` should not pick this kernel for these inputs, or None."""
    if dtype != torch.bfloat16 or c_in is None or c_in < GEMM_BOUND_C_IN:
        return None
    if not torch.backends.mkldnn.enabled:
        return None  # eager's bf16 conv is then ATen's slow fallback: this kernel wins
    if _amx_bf16():
        return None  # this kernel's GEMMs run on AMX too
    if _has_avx512_bf16():
        return (f"bfloat16 with C_in >= {GEMM_BOUND_C_IN} on a CPU with AVX512-BF16 but no "
                "AMX: eager's oneDNN convolution multiplies in bfloat16, this kernel in float32")
    return None


def details() -> str:
    """How the kernels run here: the threads their at::parallel_for gets (one when the extension
    was built without the OpenMP that torch's parallel backend needs), and how bfloat16 tiles
    are multiplied (on AMX tiles where the CPU has AMX-BF16 and oneDNN is enabled)."""
    threads, wanted = torch.ops.fpn_kernels.cpu_parallel_threads(), torch.get_num_threads()
    text = f"at::parallel_for on {threads} of {wanted} intra-op threads"
    if threads < wanted:
        text += " (built without OpenMP: the kernels' tiles run one after another)"
    # float32 (and float64) tiles go through at::mm, i.e. MKL's sgemm, which picks its own
    # kernel by ISA; torch's dispatch level says which ISA this CPU offers it.
    text += (f"; float32 GEMMs via at::mm (MKL, {torch.backends.cpu.get_cpu_capability()} "
             "on this CPU)")
    if _amx_bf16():
        text += "; bfloat16 GEMMs on AMX tiles via oneDNN's brgemm"
    else:
        why = ("torch.backends.mkldnn is disabled" if not torch.backends.mkldnn.enabled
               else "no AMX-BF16 on this CPU")
        text += f"; bfloat16 GEMMs as float32: {why}"
    if auto_declines(torch.bfloat16, False, GEMM_BOUND_C_IN) is not None:
        text += (f"; backend='auto' leaves bfloat16 merges with C_in >= {GEMM_BOUND_C_IN} "
                 "(any layout) to eager's oneDNN convolution, which is faster there")
    return text


def forward(lateral, weight, bias, top, mode, scale_factor, channels_last, index_kernel):
    return torch.ops.fpn_kernels.fused_forward(
        lateral, weight, bias, top, mode, scale_factor, channels_last, index_kernel
    )


def backward(grad_out, lateral, weight, top_hw, mode, scale_factor, channels_last, index_kernel,
             needs):
    grads = torch.ops.fpn_kernels.fused_backward(
        grad_out, lateral, weight, top_hw, mode, scale_factor, channels_last, index_kernel, needs
    )
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True))
