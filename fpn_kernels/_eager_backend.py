"""The "eager" backend: the reference implementation, always available."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .reference import source_pixel_map, upsample_add_conv1x1_reference, upsample_adjoint


def forward(lateral, weight, bias, top, mode, scale_factor, channels_last, index_kernel) -> Tensor:
    return upsample_add_conv1x1_reference(lateral, weight, bias, top, mode, scale_factor)


def backward(grad_out, lateral, weight, top_hw: Sequence[int], mode, scale_factor, channels_last,
             index_kernel, needs):
    """Only the gradients in ``needs``. The 1x1 conv's through ATen's own convolution backward
    (what eager autograd runs for the forward's conv2d: oneDNN on CPU, cuDNN on CUDA; the
    reference's einsum for grad_weight ran 4x slower than eager autograd in bf16 channels_last);
    grad_top as the spec's exact adjoint of the forward gather (reference.upsample_adjoint)."""
    need_lateral, need_weight, need_bias, need_top = needs
    c_out, c_in = weight.shape[0], weight.shape[1]
    grad_lateral = grad_weight = grad_bias = grad_top = None
    if need_lateral or need_weight or need_bias:
        grad_lateral, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            grad_out, lateral, weight.reshape(c_out, c_in, 1, 1), [c_out] if need_bias else None,
            [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_lateral, need_weight, need_bias])
        if grad_weight is not None:
            grad_weight = grad_weight.reshape(c_out, c_in)
    if need_top:
        src = source_pixel_map(top_hw, grad_out.shape[2:], mode, scale_factor,
                               index_kernel == "cpu_channels_last", grad_out.dtype,
                               grad_out.device)
        grad_top = upsample_adjoint(grad_out, top_hw, src)
    return grad_lateral, grad_weight, grad_bias, grad_top
