"""The "cpu" backend: the fused C++ kernels in csrc/cpu (torch.ops.fpn_kernels.fused_*)."""

from __future__ import annotations

import torch

from . import _cpp


def unavailable_reason() -> str | None:
    return _cpp.load("_C")


# backend="auto" leaves a merge to eager where eager's oneDNN convolution has native bfloat16
# GEMMs and this kernel does not, on GEMM-bound levels (C_in >= 512: R50's P4, P3): the CPU has
# AVX512-BF16 but this kernel's bf16 GEMMs run as fp32 copies (ATen's brgemm refused the bf16
# product, see csrc/cpu/bf16_gemm.cpp: a torch built without oneDNN's ukernel). Measured,
# forward, cpu / eager time in one interleaved `bench` run each, on a Zen 4 EPYC (AVX512-BF16,
# no AMX) with the fp32-copy GEMMs (2026-12-02): bf16 NCHW P4 2.1x, P3 1.25x slower;
# channels_last P4 2.6x, P3 2.3x slower; P2 (C_in 256) 1.5x / 1.2x faster, so it stays on this
# kernel. Since 2026-12-04 this kernel's bf16 GEMMs run on oneDNN's brgemm with AVX512-BF16 on
# that CPU too (as on AMX since 2026-12-03), and the rule leaves nothing to eager there.
#
# No float32 rule: on the Zen 4 EPYC, where this kernel's fp32 channels_last GEMMs run the same
# oneDNN ukernel as eager's convolution (csrc/cpu/f32_gemm.h), a rule that sent channels_last
# P4 (C_in 1024) to eager was tried on 2026-12-04 and dropped the same day: the eager backend
# (what "auto" would run) was 9% faster forward in one full-matrix run, tied in the next, and
# 2% slower forward and 3% slower forward+backward in a third, after fp32 grad_weight moved to
# the brgemm. On 2026-12-07 (interleaved in one process) the eager backend was slower than this
# kernel at channels_last P4 and P3 in both dtypes, forward (1-22%) and forward+backward
# (4-25%), so no rule for those levels either (README, "Which CPU kernel auto picks").
# An explicit backend="cpu" still runs them. The rule reads the ISA, never a timing.
GEMM_BOUND_C_IN = 512

BF16_GEMM_NAMES = {"amx_bf16": "AMX tiles", "avx512_bf16": "AVX512-BF16 (VDPBF16PS)"}


def _bf16_gemm_isa() -> str:
    """The ISA the kernels' bfloat16 GEMMs run on now through oneDNN's brgemm: "amx_bf16",
    "avx512_bf16", or "" where they multiply fp32 copies (neither ISA, or oneDNN disabled)."""
    return str(torch.ops.fpn_kernels.cpu_bf16_gemm_isa())


def _has_avx512_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def auto_declines(dtype: torch.dtype, channels_last: bool, c_in: int | None) -> str | None:
    """Why ``backend="auto"`` should not pick this kernel for these inputs, or None."""
    if dtype != torch.bfloat16 or c_in is None or c_in < GEMM_BOUND_C_IN:
        return None
    if not torch.backends.mkldnn.enabled:
        return None  # eager's bf16 conv is then ATen's slow fallback: this kernel wins
    if _bf16_gemm_isa():
        return None  # this kernel's GEMMs are native bf16 too
    if _has_avx512_bf16():
        return (f"bfloat16 with C_in >= {GEMM_BOUND_C_IN} on a CPU with AVX512-BF16 where this "
                "kernel's bfloat16 GEMMs run as float32 (ATen's brgemm refused them): eager's "
                "oneDNN convolution multiplies in bfloat16")
    return None


def details() -> str:
    """How the kernels run here: the threads their at::parallel_for gets (one when the extension
    was built without the OpenMP that torch's parallel backend needs), and which GEMM each dtype
    uses (bfloat16 on oneDNN's brgemm where the CPU has AMX-BF16 or AVX512-BF16 and oneDNN is
    enabled)."""
    threads, wanted = torch.ops.fpn_kernels.cpu_parallel_threads(), torch.get_num_threads()
    text = f"at::parallel_for on {threads} of {wanted} intra-op threads"
    if threads < wanted:
        text += " (built without OpenMP: the kernels' tiles run one after another)"
    # float32 (and float64) tiles go through at::mm, i.e. MKL's sgemm, which picks its own
    # kernel by ISA; torch's dispatch level says which ISA this CPU offers it. float32 GEMMs
    # take oneDNN's brgemm instead on AVX-512 CPUs without AMX (csrc/cpu/f32_gemm.h).
    mkl = f"at::mm (MKL, {torch.backends.cpu.get_cpu_capability()} on this CPU)"
    if torch.ops.fpn_kernels.cpu_f32_brgemm():
        text += f"; float32 GEMMs via oneDNN's brgemm (AVX-512), float64/float16 via {mkl}"
    else:
        text += f"; float32 GEMMs via {mkl}"
    isa = _bf16_gemm_isa()
    if isa:
        text += f"; bfloat16 GEMMs on {BF16_GEMM_NAMES.get(isa, isa)} via oneDNN's brgemm"
    else:
        why = ("torch.backends.mkldnn is disabled" if not torch.backends.mkldnn.enabled
               else "no AMX-BF16 or AVX512-BF16 brgemm on this CPU")
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
