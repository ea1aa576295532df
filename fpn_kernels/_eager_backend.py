"""The "eager" backend: the reference implementation, always available."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .reference import upsample_add_conv1x1_reference, upsample_add_conv1x1_reference_backward


def forward(lateral, weight, bias, top, mode, scale_factor, channels_last, index_kernel) -> Tensor:
    return upsample_add_conv1x1_reference(lateral, weight, bias, top, mode, scale_factor)


def backward(grad_out, lateral, weight, top_hw: Sequence[int], mode, scale_factor, channels_last,
             index_kernel, needs):
    grads = upsample_add_conv1x1_reference_backward(
        grad_out, lateral, weight, top_hw, mode, scale_factor,
        vectorized_upsample=index_kernel == "cpu_channels_last",
    )
    return tuple(g if need else None for g, need in zip(grads, needs, strict=True))
