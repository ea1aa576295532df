"""The "cpu" backend: the fused C++ kernels in csrc/cpu (torch.ops.fpn_kernels.fused_*)."""

from __future__ import annotations

import torch

from . import _cpp


def unavailable_reason() -> str | None:
    return _cpp.load("_C")


def details() -> str:
    """How the kernels run here: the threads their at::parallel_for gets (one when the extension
    was built without the OpenMP that torch's parallel backend needs), and how bfloat16 tiles
    are multiplied (on AMX tiles where the CPU has AMX-BF16 and oneDNN is enabled)."""
    threads, wanted = torch.ops.fpn_kernels.cpu_parallel_threads(), torch.get_num_threads()
    text = f"at::parallel_for on {threads} of {wanted} intra-op threads"
    if threads < wanted:
        text += " (built without OpenMP: the kernels' tiles run one after another)"
    if torch.ops.fpn_kernels.cpu_amx_bf16_gemm():
        text += "; bfloat16 GEMMs on AMX tiles via oneDNN's brgemm"
    else:
        why = ("torch.backends.mkldnn is disabled" if not torch.backends.mkldnn.enabled
               else "no AMX-BF16 on this CPU")
        text += f"; bfloat16 GEMMs as float32: {why}"
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
