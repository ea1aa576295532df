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
# It also leaves float32 channels_last merges with C_in >= 1024 (R50's P4: few pixels, the
# longest reduction) to eager on CPUs with AVX-512 but no AMX (Zen 4), where this kernel's fp32
# channels_last GEMMs run the same oneDNN ukernel as eager's convolution
# (csrc/cpu/f32_gemm.h) and still lose: in two full-matrix runs on a Zen 4 EPYC (2026-12-04,
# the second is benchmarks/results/bench-cpu-zen4-matrix.json) cpu 24.2 / 21.4 ms forward
# against 22.0 / 21.3 for the eager backend (what "auto" runs instead), 70.7 / 87.0 against
# 70.6 / 81.4 forward+backward, and 0.93x / 0.96x eager in two interleaved forward runs of their
# own; P3 (C_in 512) is 1.2-1.6x faster there and stays fused. (The fp32-copy bf16 numbers
# above: benchmarks/results/bench-cpu-zen4-matrix-fwd.json.)
# bfloat16 channels_last P4 ties there (10.5 / 10.5 ms forward; forward+backward the kernel 11%
# faster) and stays fused; on the AMX Xeon this kernel's fp32 P4 was 1.03x eager and stays too.
# An explicit backend="cpu" still runs them. The rules read the ISA, never a timing.
GEMM_BOUND_C_IN = 512
F32_CHANNELS_LAST_EAGER_C_IN = 1024

BF16_GEMM_NAMES = {"amx_bf16": "AMX tiles", "avx512_bf16": "AVX512-BF16 (VDPBF16PS)"}


def _bf16_gemm_isa() -> str:
    """The ISA the kernels' bfloat16 GEMMs run on now through oneDNN's brgemm: "amx_bf16",
    "avx512_bf16", or "" where they multiply fp32 copies (neither ISA, or oneDNN disabled)."""
    return str(torch.ops.fpn_kernels.cpu_bf16_gemm_isa())


def _has_avx512_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe()) if probe is not None else False


def _f32_brgemm() -> bool:
    """Whether the kernels' fp32 channels_last GEMMs run on oneDNN's brgemm now (AVX-512 without
    AMX, oneDNN on): the Zen 4 kind of CPU."""
    return bool(torch.ops.fpn_kernels.cpu_f32_brgemm())


def auto_declines(dtype: torch.dtype, channels_last: bool, c_in: int | None) -> str | None:
    """Why ``backend="auto"`` should not pick this kernel for these inputs, or None."""
    if c_in is None or not torch.backends.mkldnn.enabled:
        return None  # unknown channels; or eager's conv is ATen's slow fallback: this kernel wins
    if (dtype == torch.float32 and channels_last and c_in >= F32_CHANNELS_LAST_EAGER_C_IN
            and _f32_brgemm()):
        return (f"float32 channels_last with C_in >= {F32_CHANNELS_LAST_EAGER_C_IN} on a CPU "
                "with AVX-512 but no AMX: eager's oneDNN convolution runs the same GEMM there "
                "and is faster")
    if dtype != torch.bfloat16 or c_in < GEMM_BOUND_C_IN:
        return None
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
    # kernel by ISA; torch's dispatch level says which ISA this CPU offers it. channels_last
    # float32 tiles take oneDNN's brgemm instead on AVX-512 CPUs (csrc/cpu/f32_gemm.h).
    mkl = f"at::mm (MKL, {torch.backends.cpu.get_cpu_capability()} on this CPU)"
    if torch.ops.fpn_kernels.cpu_f32_brgemm():
        text += f"; float32 GEMMs via oneDNN's brgemm (channels_last) and {mkl} (NCHW)"
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
    if auto_declines(torch.float32, True, F32_CHANNELS_LAST_EAGER_C_IN) is not None:
        text += (f"; backend='auto' leaves float32 channels_last merges with C_in >= "
                 f"{F32_CHANNELS_LAST_EAGER_C_IN} to eager's oneDNN convolution, which is faster "
                 "there")
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
