"""The one place tests call the compiled kernels directly (``torch.ops.fpn_kernels.fused_*``).

The GPU tests (tests/test_cuda_backend.py) and CPU tests (tests/test_fused_calls.py) both go
through these two functions, so a change of the C++ schema breaks a test that runs on every
machine instead of ~100 GPU tests at once. Arguments are passed by the schema's names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fpn_kernels.indexing import aten_index_kernel, index_kernel_for, takes_vectorized_kernel


def fused_forward(lateral: torch.Tensor, weight2d: torch.Tensor, bias: torch.Tensor | None,
                  top: torch.Tensor, mode: str = "nearest",
                  scale_factor: Sequence[float] | None = None, channels_last: bool = False,
                  index_kernel: str | None = None) -> torch.Tensor:
    """``index_kernel`` defaults to the ATen index computation eager runs for this ``top``."""
    if index_kernel is None:
        index_kernel = aten_index_kernel(top, lateral.shape[2:])
    return torch.ops.fpn_kernels.fused_forward(
        lateral=lateral, weight=weight2d, bias=bias, top=top, mode=mode,
        scale_factor=None if scale_factor is None else list(scale_factor),
        channels_last=channels_last, index_kernel=index_kernel,
    )


def fused_backward(grad_out: torch.Tensor, lateral: torch.Tensor, weight2d: torch.Tensor,
                   top_hw: Sequence[int], mode: str = "nearest",
                   scale_factor: Sequence[float] | None = None, channels_last: bool = False,
                   needs: Sequence[bool] = (True, True, True, True),
                   index_kernel: str | None = None):
    """``index_kernel`` defaults to the one of the forward for an NCHW/NHWC ``top`` like
    ``lateral`` (on CUDA always "cuda")."""
    if index_kernel is None:
        top_like = torch.empty((lateral.shape[0], weight2d.shape[0], *top_hw), device="meta")
        if channels_last:
            top_like = top_like.contiguous(memory_format=torch.channels_last)
        index_kernel = index_kernel_for(lateral.device.type, takes_vectorized_kernel(top_like),
                                        lateral.shape[2:])
    return torch.ops.fpn_kernels.fused_backward(
        grad_out=grad_out, lateral=lateral, weight=weight2d, top_hw=list(top_hw), mode=mode,
        scale_factor=None if scale_factor is None else list(scale_factor),
        channels_last=channels_last, index_kernel=index_kernel, needs=list(needs),
    )
