"""How the fused op leaves PyTorch: ONNX (both exporters) as standard ONNX operators.

Registered when ``fpn_kernels`` is imported, so a plain ``torch.onnx.export(m, args, f)`` or
``torch.onnx.export(m, args, f, dynamo=False)`` of a model that uses the op writes no node in an
``fpn_kernels`` domain:

* ``dynamo=True`` (torch's default): :func:`decompose` is registered in ``torch._decomp``'s global
  decomposition table, which the ONNX exporter applies to every op it has no translation for.
  ``torch.compile``, a plain ``torch.export`` (``run_decompositions()``) and AOTInductor do not
  use that table, so they keep the one fused node. The decomposition is the eager spec itself
  (``conv2d + interpolate + add``), so the exporter translates it as it translates an
  unconverted model: ``Conv`` + ``Resize`` (``sizes``; asymmetric / floor) + ``Add`` for
  ``mode="nearest"``, and for ``"nearest-exact"`` the exact index gather torch exports for
  ``F.interpolate(mode="nearest-exact")``. (A scale factor that is not a whole number keeps
  eager's ``1 / s`` step: ``Resize`` with ``scales``.)
* ``dynamo=False``: :func:`onnx_symbolic` via ``torch.onnx.register_custom_op_symbolic``
  (as torchvision does for its ops), emitting the same operators.

Why no ``Resize`` for "nearest-exact": ONNX Runtime's half_pixel / round_prefer_ceil Resize
divides by ``out / in`` where ATen multiplies by ``in / out``, and the two round apart even on
FPN shapes (99 destination pixels from 50 source pixels: one pixel reads a neighbour). The
gather computes ATen's own float32 formula, ``floor((dst + 0.5) * (in / out))``, so it is exact.
For "nearest" the asymmetric / floor Resize agrees with ATen on the FPN ratios (out = in,
2 in - 1, 2 in) and is what torch itself exports for an unconverted FPN, so it is kept.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import _memory_format, is_channels_last  # also defines the op

OP = torch.ops.fpn_kernels.upsample_add_conv1x1.default
OPSET = 11  # the first opset whose Resize takes `sizes`


def _integral(scale_factor) -> bool:
    return all(float(s).is_integer() for s in scale_factor)


def decompose(lateral: Tensor, weight: Tensor, bias: Tensor | None, top: Tensor,
              mode: str = "nearest", scale_factor: list[float] | None = None,
              backend: str = "auto") -> Tensor:
    """The op as ``conv2d + interpolate + add``, in the fake kernel's output layout.

    An integral scale factor is passed as the size it gives (the op checked ``H == h * s``):
    then ATen's source step ``in / out`` equals ``1 / s`` exactly (both round the same real
    number to float32) and ONNX gets a ``Resize`` with ``sizes``. Other scale factors keep
    ATen's ``1 / s`` step, as eager computes it.
    """
    c_out, c_in = weight.shape[0], weight.shape[1]
    lat = F.conv2d(lateral, weight.reshape(c_out, c_in, 1, 1), bias)
    if scale_factor is None or _integral(scale_factor):
        up = F.interpolate(top, size=lateral.shape[-2:], mode=mode)
    else:
        up = F.interpolate(top, scale_factor=tuple(scale_factor), mode=mode)
    return (lat + up).contiguous(memory_format=_memory_format(is_channels_last(lateral)))


# --------------------------------------------------------------------------- legacy exporter


def _const(g, value, dtype=None):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _axis_indices(g, top, lateral, axis: int, mode: str, scale: float | None):
    """int64 source index of every destination pixel along ``axis``, as ATen computes it in
    float32: ``min(floor((dst + offset) * step), in - 1)``, ``step = in / out`` or ``1 / s``."""
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

    def size(t):  # a 0-D int64
        return sh._size_helper(g, t, _const(g, axis))

    def f32(x):
        return g.op("Cast", x, to_i=sh.cast_pytorch_to_onnx["Float"])

    in_size, out_size = size(top), size(lateral)
    if scale is None:
        step = g.op("Div", f32(in_size), f32(out_size))
    else:
        step = _const(g, 1.0 / scale, torch.float32)
    dst = f32(g.op("Range", _const(g, 0), out_size, _const(g, 1)))
    if mode == "nearest-exact":
        dst = g.op("Add", dst, _const(g, 0.5))
    src = g.op("Cast", g.op("Floor", g.op("Mul", dst, step)), to_i=sh.cast_pytorch_to_onnx["Long"])
    last = g.op("Sub", in_size, _const(g, 1))
    return g.op("Min", src, last)


def onnx_symbolic(g, lateral, weight, bias, top, mode, scale_factor, backend):
    """``Conv`` + (``Resize`` | exact gather) + ``Add`` for the legacy exporter: the operators
    the dynamo exporter writes for :func:`decompose`."""
    from torch.onnx._internal.torchscript_exporter import symbolic_helper as sh

    mode = sh._maybe_get_const(mode, "s")
    scale = None if sh._is_none(scale_factor) else sh._maybe_get_const(scale_factor, "fs")
    if scale is not None and _integral(scale):
        scale = None  # exact as in / out, like decompose()
    if weight.type().dim() == 2:  # (C_out, C_in) -> (C_out, C_in, 1, 1)
        weight = sh._unsqueeze_helper(g, weight, [2, 3])
    conv_inputs = (lateral, weight) if sh._is_none(bias) else (lateral, weight, bias)
    conv = g.op("Conv", *conv_inputs)
    if mode == "nearest":
        no_roi = _const(g, [], torch.float32)
        if scale is None:
            batch_channels = g.op("Slice", g.op("Shape", top), _const(g, [0]), _const(g, [2]))
            spatial = g.op("Slice", g.op("Shape", lateral), _const(g, [2]), _const(g, [4]))
            resize_inputs = (no_roi, no_roi, g.op("Concat", batch_channels, spatial, axis_i=0))
        else:
            resize_inputs = (no_roi, _const(g, [1.0, 1.0, *scale], torch.float32))
        up = g.op("Resize", top, *resize_inputs, mode_s="nearest",
                  coordinate_transformation_mode_s="asymmetric", nearest_mode_s="floor")
    else:
        up = top
        for axis in (2, 3):
            src = _axis_indices(g, top, lateral, axis, mode, None if scale is None else
                                scale[axis - 2])
            up = g.op("Gather", up, src, axis_i=axis)
    return g.op("Add", conv, up)


def _register() -> None:
    """Both routes, once, at import. A torch whose mechanisms moved must not break the import
    of the op itself: it warns instead (and tests/test_onnx.py fails by name)."""
    try:
        torch._decomp.register_decomposition(OP)(decompose)
        torch.onnx.register_custom_op_symbolic("fpn_kernels::upsample_add_conv1x1",
                                               onnx_symbolic, OPSET)
    except Exception as exc:  # noqa: BLE001 - any failure means: no ONNX export route
        warnings.warn(f"fpn_kernels: ONNX export of the fused op is not available on torch "
                      f"{torch.__version__}: {type(exc).__name__}: {exc}", RuntimeWarning,
                      stacklevel=2)


_register()
