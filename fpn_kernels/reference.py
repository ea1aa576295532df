"""The eager implementation: the spec every backend is tested against.

``upsample_add_conv1x1(lateral, weight, bias, top)`` is, by definition::

    F.conv2d(lateral, weight.view(C_out, C_in, 1, 1), bias)
        + F.interpolate(top, size=lateral.shape[-2:], mode=mode)

or ``F.interpolate(top, scale_factor=scale_factor, mode=mode)`` when a scale factor is given
(what detectron2 and mmdet pass), whose output size must then equal ``lateral``'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def upsample_add_conv1x1_reference(
    lateral: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    top: Tensor,
    mode: str = "nearest",
    scale_factor: Sequence[float] | float | None = None,
) -> Tensor:
    c_out, c_in = weight.shape[0], weight.shape[1]
    lat = F.conv2d(lateral, weight.reshape(c_out, c_in, 1, 1), bias)
    if scale_factor is None:
        up = F.interpolate(top, size=lateral.shape[-2:], mode=mode)
    else:
        if not isinstance(scale_factor, (int, float)):
            scale_factor = tuple(float(s) for s in scale_factor)
        up = F.interpolate(top, scale_factor=scale_factor, mode=mode)
    return lat + up


def upsample_add_conv1x1_reference_backward(
    grad_out: Tensor,
    lateral: Tensor,
    weight: Tensor,
    top_hw: Sequence[int],
    mode: str = "nearest",
    scale_factor: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The reference's gradients with the eager ops autograd itself runs (no autograd needed,
    so it also works inside a custom op): (grad_lateral, grad_weight (C_out, C_in), grad_bias,
    grad_top)."""
    c_out, c_in = weight.shape[0], weight.shape[1]
    w = weight.reshape(c_out, c_in)
    grad_lateral = F.conv2d(grad_out, w.t().reshape(c_in, c_out, 1, 1))
    grad_weight = torch.einsum("nohw,nchw->oc", grad_out, lateral)
    grad_bias = grad_out.sum(dim=(0, 2, 3))
    sh, sw = (None, None) if scale_factor is None else (float(s) for s in scale_factor)
    upsample_backward = (
        torch.ops.aten.upsample_nearest2d_backward
        if mode == "nearest"
        else torch.ops.aten._upsample_nearest_exact2d_backward
    )
    top_size = [grad_out.shape[0], c_out, *top_hw]
    grad_top = upsample_backward(grad_out, list(grad_out.shape[2:]), top_size, sh, sw)
    return grad_lateral, grad_weight, grad_bias, grad_top
