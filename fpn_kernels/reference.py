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
    vectorized_upsample: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The reference's gradients with eager ops (no autograd, so it also works inside a custom
    op): (grad_lateral, grad_weight (C_out, C_in), grad_bias, grad_top).
    ``vectorized_upsample``: see :func:`source_pixel_map`."""
    c_out, c_in = weight.shape[0], weight.shape[1]
    w = weight.reshape(c_out, c_in)
    grad_lateral = F.conv2d(grad_out, w.t().reshape(c_in, c_out, 1, 1))
    grad_weight = torch.einsum("nohw,nchw->oc", grad_out, lateral)
    grad_bias = grad_out.sum(dim=(0, 2, 3))
    src = source_pixel_map(top_hw, grad_out.shape[2:], mode, scale_factor, vectorized_upsample,
                           grad_out.dtype, grad_out.device)
    grad_top = upsample_adjoint(grad_out, top_hw, src)
    return grad_lateral, grad_weight, grad_bias, grad_top


def source_pixel_map(
    top_hw: Sequence[int],
    out_hw: Sequence[int],
    mode: str,
    scale_factor: Sequence[float] | None,
    vectorized_upsample: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """For every output pixel, the flat index of the top pixel eager's ``F.interpolate`` reads,
    probed through ``F.interpolate`` itself with a tensor that takes the same ATen kernel as the
    real ``top``: channels_last with 4 channels when ``vectorized_upsample``
    (``indexing.takes_vectorized_kernel``), else 1 NCHW channel (then the output size decides,
    as it does for ``top``); float64 math for float64 tensors, float32 otherwise."""
    h, w = top_hw
    channels = 4 if vectorized_upsample else 1
    probe_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # exact integers
    probe = torch.arange(h * w, dtype=probe_dtype, device=device).reshape(1, 1, h, w)
    probe = probe.expand(1, channels, h, w).contiguous(
        memory_format=torch.channels_last if vectorized_upsample else torch.contiguous_format
    )
    if scale_factor is None:
        mapped = F.interpolate(probe, size=tuple(out_hw), mode=mode)
    else:
        mapped = F.interpolate(probe, scale_factor=tuple(scale_factor), mode=mode)
    return mapped[0, 0].reshape(-1).long()


# Elements per fp32 widening in upsample_adjoint: 4 MB, which glibc's allocator serves again
# from its heap instead of fresh pages.
_WIDEN_CHUNK = 1 << 20


def upsample_adjoint(grad_out: Tensor, top_hw: Sequence[int], src: Tensor) -> Tensor:
    """grad_top: the exact adjoint of the forward gather ``src`` (:func:`source_pixel_map`):
    each top pixel sums the output pixels that read it, in fp32 (fp64 for fp64), in the order of
    the output pixels, then rounds once. Eager's own upsample backward is not always that
    adjoint (its CUDA backward uses another formula; its CPU backward always uses the vectorized
    kernel's indices), so the spec derives it from the forward mapping.

    One ``index_add_`` over the pixels, in the layout ``grad_out`` has: a channels_last
    gradient adds whole rows of channels per pixel, image by image (through NCHW views, a
    scatter of one pixel at a time, it took 179-197 ms at R50's P2 in bf16, now 8.3, ATen's
    upsample backward 6-10; Zen 4, 2026-12-08); the
    widening to fp32 goes in chunks of ~1M elements, whose buffers the allocator reuses (one
    fp32 copy of a P2 gradient, 124 MB of fresh pages, took 37 ms). Chunks of pixels or
    channels keep every sum's order, so the bits are those of one ``index_add_`` of the whole
    fp32 gradient."""
    n, c, h, w = grad_out.shape
    top_h, top_w = top_hw
    acc_dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    pixels = h * w
    if grad_out.is_contiguous(memory_format=torch.channels_last) and not grad_out.is_contiguous():
        grad_rows = grad_out.permute(0, 2, 3, 1).reshape(n, pixels, c)  # a view
        grad_top = torch.zeros(n, top_h * top_w, c, dtype=acc_dtype, device=grad_out.device)
        rows = max(1, _WIDEN_CHUNK // max(1, c))
        for image in range(n):
            for p0 in range(0, pixels, rows):
                grad_top[image].index_add_(0, src[p0:p0 + rows],
                                           grad_rows[image, p0:p0 + rows].to(acc_dtype))
        return grad_top.reshape(n, top_h, top_w, c).permute(0, 3, 1, 2).to(grad_out.dtype)
    grad_planes = grad_out.reshape(n, c, pixels)
    grad_top = torch.zeros(n, c, top_h * top_w, dtype=acc_dtype, device=grad_out.device)
    channels = max(1, _WIDEN_CHUNK // max(1, n * pixels))
    for c0 in range(0, c, channels):
        grad_top[:, c0:c0 + channels].index_add_(2, src,
                                                 grad_planes[:, c0:c0 + channels].to(acc_dtype))
    return grad_top.reshape(n, c, top_h, top_w).to(grad_out.dtype)

