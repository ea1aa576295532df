"""The op: ``torch.ops.fpn_kernels.upsample_add_conv1x1`` and its public wrapper.

``upsample_add_conv1x1(lateral, weight, bias, top)`` computes, in one pass,
``conv2d(lateral, weight, bias) + interpolate(top, size=lateral.shape[-2:], mode=mode)``.

Layers, outermost first:

* :func:`upsample_add_conv1x1` (public): validates every argument with errors that name it,
  applies autocast like eager would, resolves ``backend="auto"``, calls the custom op.
* ``fpn_kernels::upsample_add_conv1x1`` (``torch.library.custom_op``): one opaque node for
  ``torch.compile``/``torch.export``, with a fake kernel and autograd. It normalizes the
  layout (see ``backends.py``) and calls the chosen backend.
* ``fpn_kernels::upsample_add_conv1x1_backward``: the fused backward, also a custom op.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import math
import numbers  # numpy scalars count as real scale factors, like in F.interpolate
import sys
from collections.abc import Sequence
from typing import TypeGuard

import torch
from torch import Tensor

from . import backends
from .indexing import MODES, aten_index_kernel, index_kernel_for, takes_vectorized_kernel
from .reference import upsample_add_conv1x1_reference
from .triton import graph as triton_graph

# --------------------------------------------------------------------------- validation


def _shape(t: Tensor) -> str:
    return f"{t.dim()}-D tensor of shape {tuple(t.shape)}"


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _normalize_scale_factor(
    scale_factor: object, top_hw: Sequence[int], out_hw: Sequence[int]
) -> list[float] | None:
    if scale_factor is None:
        return None

    def is_real(s: object) -> TypeGuard[numbers.Real]:
        return isinstance(s, numbers.Real) and not isinstance(s, bool)

    # The caller's real numbers, then (below) the same values as floats.
    pair: list[numbers.Real] | list[float]
    if is_real(scale_factor):
        pair = [scale_factor, scale_factor]
    elif (
        isinstance(scale_factor, Sequence)
        and not isinstance(scale_factor, str)
        and all(is_real(s) for s in scale_factor)
    ):
        pair = list(scale_factor)
    else:
        raise TypeError(
            "scale_factor: expected None, a float or a pair of floats, "
            f"got {scale_factor!r} ({type(scale_factor).__name__})"
        )
    if len(pair) != 2:
        raise ValueError(
            f"scale_factor: expected one value or a pair (scale_h, scale_w), got {len(pair)} "
            f"values {scale_factor!r}"
        )
    pair = [float(s) for s in pair]
    if not all(math.isfinite(s) and s > 0 for s in pair):
        raise ValueError(f"scale_factor: expected finite values > 0, got {scale_factor!r}")
    # With symbolic sizes (torch.export, torch.compile(dynamic=True)) the check would specialize
    # them; the op itself repeats it on concrete sizes (check_scale_factor_size in its kernel).
    if all(isinstance(i, int) for i in (*top_hw, *out_hw)):
        check_scale_factor_size(pair, top_hw, out_hw, given=scale_factor)
    return pair


def check_scale_factor_size(
    scale_factor: Sequence[float] | None, top_hw: Sequence[int], out_hw: Sequence[int],
    given: object = None,
) -> None:
    """F.interpolate's output size for a scale factor is floor(in * scale) (in float64): it
    must be lateral's size, or eager's add would fail. ``given``: the caller's own value, for
    the message."""
    if scale_factor is None:
        return
    got = [math.floor(float(i) * s) for i, s in zip(top_hw, scale_factor, strict=True)]
    if got != [int(o) for o in out_hw]:
        shown = list(scale_factor) if given is None else given
        raise ValueError(
            f"scale_factor: {shown!r} upsamples top's {tuple(top_hw)} to "
            f"{tuple(got)}, but lateral's spatial size is {tuple(out_hw)}"
        )


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` gives conv2d on ``device_type``, or None when it is off."""
    # CPU and CUDA always have autocast; asking is_autocast_available() only for other devices
    # also keeps torch 2.11's dynamo, which cannot trace that call, out of it.
    available = device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)
    if available and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def validate(
    lateral: Tensor, weight: Tensor, bias: Tensor | None, top: Tensor, mode: str,
    scale_factor: object,
) -> list[float] | None:
    """Check every argument; return the normalized scale factor ``[sh, sw]`` or None.

    Accepts exactly what eager accepts (and raises ``TypeError``/``ValueError`` naming the
    argument, what was expected and what came, where eager would fail somewhere inside).
    """
    lateral = _check_tensor("lateral", lateral)
    weight = _check_tensor("weight", weight)
    top = _check_tensor("top", top)
    if bias is not None:
        bias = _check_tensor("bias", bias)
    if not isinstance(mode, str):
        raise TypeError(f"mode: expected a str, got {type(mode).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
    if lateral.dim() != 4:
        raise ValueError(f"lateral: expected a 4-D tensor (N, C_in, H, W), got a {_shape(lateral)}")
    if top.dim() != 4:
        raise ValueError(f"top: expected a 4-D tensor (N, C_out, h, w), got a {_shape(top)}")
    if not (weight.dim() == 2 or (weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1))):
        raise ValueError(
            "weight: expected a (C_out, C_in, 1, 1) or (C_out, C_in) tensor, "
            f"got a {_shape(weight)}"
        )
    for name, t in (("lateral", lateral), ("weight", weight), ("top", top), ("bias", bias)):
        if t is not None and t.dtype not in backends.FLOAT_DTYPES:
            raise TypeError(
                f"{name}: expected a floating-point tensor (float16, bfloat16, float32, float64), "
                f"got {t.dtype}"
            )
    # Under torch.autocast eager's conv2d casts lateral, weight and bias to the autocast dtype
    # (all but float64, which autocast leaves alone) and the add promotes with top's dtype, so
    # dtypes may differ exactly as far as eager accepts them.
    autocast_dtype = _autocast_dtype(lateral.device.type)

    def conv_dtype(t: Tensor) -> torch.dtype:
        return t.dtype if autocast_dtype is None or t.dtype == torch.float64 else autocast_dtype

    for name, t in (("weight", weight), ("top", top), ("bias", bias)):
        if t is None:
            continue
        if t.device != lateral.device:
            raise ValueError(
                f"{name}: expected a tensor on {lateral.device} (lateral's device), got {t.device}"
            )
        if autocast_dtype is None and t.dtype != lateral.dtype:
            raise TypeError(f"{name}: expected dtype {lateral.dtype} (lateral's), got {t.dtype}")
        if name != "top" and conv_dtype(t) != conv_dtype(lateral):
            raise TypeError(
                f"{name}: expected a dtype that {autocast_dtype} autocast casts to "
                f"{conv_dtype(lateral)} like lateral's {lateral.dtype}, got {t.dtype}"
            )
    c_out, c_in = weight.shape[:2]
    if lateral.shape[1] != c_in:
        raise ValueError(
            f"weight: expected C_in = {lateral.shape[1]} (lateral's channels), got weight of shape "
            f"{tuple(weight.shape)}"
        )
    if top.shape[1] != c_out:
        raise ValueError(
            f"top: expected C_out = {c_out} channels (weight's output channels), got top of shape "
            f"{tuple(top.shape)}"
        )
    if top.shape[0] != lateral.shape[0]:
        raise ValueError(
            f"top: expected batch size {lateral.shape[0]} (lateral's), got {top.shape[0]}"
        )
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"bias: expected shape ({c_out},), got {tuple(bias.shape)}")
    # Empty sizes: eager returns an empty output for N = 0 only. It raises for C_in = 0 (conv2d
    # returns 0 channels, then the add fails), C_out = 0 (conv2d), H or W = 0 (conv2d) and
    # h or w = 0 (interpolate), so we raise too, before any kernel runs.
    if c_in == 0:
        raise ValueError(f"lateral: expected C_in >= 1 channels, got a {_shape(lateral)}")
    if c_out == 0:
        raise ValueError(f"weight: expected C_out >= 1 output channels, got a {_shape(weight)}")
    out_hw, top_hw = tuple(lateral.shape[2:]), tuple(top.shape[2:])
    if min(out_hw) == 0:
        raise ValueError(f"lateral: expected H, W >= 1, got a {_shape(lateral)}")
    if min(top_hw) == 0:
        raise ValueError(
            f"top: expected h, w >= 1 (to upsample to lateral's {out_hw}), got a {_shape(top)}"
        )
    return _normalize_scale_factor(scale_factor, top_hw, out_hw)


# --------------------------------------------------------------------------- layout


def is_channels_last(x: Tensor) -> bool:
    """The output memory format rule (like conv2d): channels_last iff ``x``'s channels are
    innermost and it is not plainly contiguous. Every backend obeys this one rule."""
    if x.is_contiguous():
        return False
    if x.is_contiguous(memory_format=torch.channels_last):
        return True
    s = x.stride()
    return x.shape[1] > 1 and s[1] < s[3] <= s[2] and s[1] < s[0]


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _weight_2d(weight: Tensor) -> Tensor:
    """(C_out, C_in, 1, 1) or (C_out, C_in) -> contiguous (C_out, C_in), as backends take it."""
    return weight.reshape(weight.shape[0], weight.shape[1]).contiguous()


def _normalize(lateral: Tensor, weight: Tensor, bias: Tensor | None, top: Tensor):
    channels_last = is_channels_last(lateral)
    fmt = _memory_format(channels_last)
    return (
        lateral.contiguous(memory_format=fmt),
        _weight_2d(weight),
        bias.contiguous() if bias is not None else None,
        top.contiguous(memory_format=fmt),
        channels_last,
    )


# Constant for a traced graph: torch.compile must not trace into the registry (imports, caches).
@torch.compiler.assume_constant_result
def _resolve(backend: str, t: Tensor) -> str:
    """``t``: lateral (its device, dtype, layout and C_in choose under "auto")."""
    return backends.select_backend(backend, t.device, t.dtype, is_channels_last(t),
                                   int(t.shape[1]))


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fpn_kernels::upsample_add_conv1x1", mutates_args=())
def _upsample_add_conv1x1(
    lateral: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    top: Tensor,
    mode: str = "nearest",
    scale_factor: list[float] | None = None,
    backend: str = "auto",
) -> Tensor:
    check_scale_factor_size(scale_factor, top.shape[2:], lateral.shape[2:])
    name = _resolve(backend, lateral)
    if name == "eager":  # the spec itself, on the caller's tensors as they are
        return upsample_add_conv1x1_reference(lateral, weight, bias, top, mode, scale_factor)
    # Which ATen index computation eager would run depends on the caller's `top` (its layout
    # and channels) and the output size, so it is decided before the layout is normalized.
    index_kernel = aten_index_kernel(top, lateral.shape[2:])
    lateral, weight2d, bias, top, channels_last = _normalize(lateral, weight, bias, top)
    return backends.BACKENDS[name].impl.forward(
        lateral, weight2d, bias, top, mode, scale_factor, channels_last, index_kernel
    )


def _declare_inductor_fallbacks(lowering) -> None:
    """Tell Inductor that both ops run as they are (a fallback kernel call). Left to itself it
    creates an implicit fallback when it first lowers one, and with the environment variable CI
    set (as in most CI systems) that refuses an op with a decomposition in torch._decomp's
    table, which the forward op has for the ONNX exporter (fpn_kernels/export.py)."""
    for op in (torch.ops.fpn_kernels.upsample_add_conv1x1.default,
               torch.ops.fpn_kernels.upsample_add_conv1x1_backward.default):
        if op not in lowering.lowerings:
            # The layout constraint Inductor's own implicit fallback would pick for the op.
            tag = torch._library.utils.get_layout_constraint_tag(op, with_default=True)
            lowering.make_fallback(op, layout_constraint=lowering.tag_to_layout_constraint(tag),
                                   warn=False, override_decomp=True)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback(module)`` once ``name`` has been imported, so that importing
    fpn_kernels does not import Inductor (~1.5 s) just to register with it."""

    def __init__(self, name: str, callback):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        loader, callback = spec.loader, self.callback

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                callback(module)

        spec.loader = Loader()
        return spec


def _when_imported(name: str, callback) -> None:
    if name in sys.modules:
        callback(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, callback))


@_upsample_add_conv1x1.register_fake
def _(lateral, weight, bias, top, mode="nearest", scale_factor=None, backend="auto"):
    n, _, h, w = lateral.shape
    fmt = _memory_format(is_channels_last(lateral))
    return lateral.new_empty((n, weight.shape[0], h, w)).contiguous(memory_format=fmt)


@torch.library.custom_op("fpn_kernels::upsample_add_conv1x1_backward", mutates_args=())
def _upsample_add_conv1x1_backward(
    grad_out: Tensor,
    lateral: Tensor,
    weight: Tensor,
    top_hw: list[int],
    mode: str,
    scale_factor: list[float] | None,
    backend: str,
    top_vectorized: bool,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``top_vectorized``: ``indexing.takes_vectorized_kernel`` of the forward's ``top``; with
    the (here concrete) output size it gives the forward's ATen index computation, so the
    backward is its exact adjoint for every size."""
    name = _resolve(backend, lateral)
    index_kernel = index_kernel_for(lateral.device.type, top_vectorized, lateral.shape[2:])
    channels_last = is_channels_last(lateral)
    fmt = _memory_format(channels_last)
    grads = backends.BACKENDS[name].impl.backward(
        grad_out.contiguous(memory_format=fmt),
        lateral.contiguous(memory_format=fmt),
        _weight_2d(weight),
        list(top_hw),
        mode,
        scale_factor,
        channels_last,
        index_kernel,
        list(needs),
    )
    # A custom op returns tensors only: an empty tensor stands for "not needed" (a fresh one
    # each, since a custom op's outputs may not alias each other).
    return tuple(  # type: ignore[return-value]
        g if g is not None else grad_out.new_empty((0,)) for g in grads
    )


@_upsample_add_conv1x1_backward.register_fake
def _(grad_out, lateral, weight, top_hw, mode, scale_factor, backend, top_vectorized, needs):
    n, c_in, _, _ = lateral.shape
    c_out = weight.shape[0]
    fmt = _memory_format(is_channels_last(lateral))
    shapes = [(n, c_in, *lateral.shape[2:]), (c_out, c_in), (c_out,), (n, c_out, *top_hw)]
    out = []
    for i, (need, shape) in enumerate(zip(needs, shapes, strict=True)):
        if not need:
            out.append(grad_out.new_empty((0,)))
        elif i in (0, 3):
            out.append(grad_out.new_empty(shape).contiguous(memory_format=fmt))
        else:
            out.append(grad_out.new_empty(shape))
    return tuple(out)


def _setup_context(ctx, inputs, output):
    lateral, weight, bias, top, mode, scale_factor, backend = inputs
    ctx.save_for_backward(lateral, weight)
    ctx.has_bias = bias is not None
    ctx.top_hw = list(top.shape[2:])
    ctx.mode, ctx.scale_factor, ctx.backend = mode, scale_factor, backend
    # The backward is the exact adjoint of the forward's index mapping, so it makes the
    # forward's choice of ATen index computation. That choice can depend on the output size,
    # which may be symbolic here: only top's layout is recorded, the backward op decides.
    ctx.top_vectorized = takes_vectorized_kernel(top)


def _backward(ctx, grad_out):
    lateral, weight = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:4])
    needs[2] = needs[2] and ctx.has_bias
    if not any(needs):
        return None, None, None, None, None, None, None
    g_lat, g_w, g_b, g_top = _upsample_add_conv1x1_backward(
        grad_out, lateral, weight, ctx.top_hw, ctx.mode, ctx.scale_factor, ctx.backend,
        ctx.top_vectorized, needs,
    )
    return (
        g_lat if needs[0] else None,
        g_w.reshape(weight.shape) if needs[1] else None,
        g_b if needs[2] else None,
        g_top if needs[3] else None,
        None,
        None,
        None,
    )


_upsample_add_conv1x1.register_autograd(_backward, setup_context=_setup_context)
# torch.compile / AOTInductor: where the backend is "triton", both ops decompose into their
# Triton launches in the AOTDispatcher (fpn_kernels/triton/graph.py); elsewhere they stay nodes.
triton_graph.register((_upsample_add_conv1x1, _upsample_add_conv1x1_backward), _resolve)
_when_imported("torch._inductor.lowering", _declare_inductor_fallbacks)


# --------------------------------------------------------------------------- public API


def _autocast(lateral, weight, bias, top):
    """Mirror eager under ``torch.autocast``: conv2d runs in the autocast dtype, interpolate
    keeps ``top``'s dtype, and the add promotes. We round the conv inputs through the autocast
    dtype (as eager does) and compute in the promoted dtype."""
    device_type = lateral.device.type
    autocast_dtype = _autocast_dtype(device_type)
    if autocast_dtype is None:
        return lateral, weight, bias, top
    # Autocast casts only float32-ish inputs of conv2d down; float64 stays float64.
    low = lateral.dtype if lateral.dtype == torch.float64 else autocast_dtype
    out_dtype = torch.promote_types(low, top.dtype)
    with torch.autocast(device_type, enabled=False):
        lateral, weight = (t.to(low).to(out_dtype) for t in (lateral, weight))
        bias = bias.to(low).to(out_dtype) if bias is not None else None
        top = top.to(out_dtype)
    return lateral, weight, bias, top


def upsample_add_conv1x1(
    lateral: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    top: Tensor,
    *,
    mode: str = "nearest",
    scale_factor: float | Sequence[float] | None = None,
    backend: str = "auto",
) -> Tensor:
    """``conv2d(lateral, weight, bias) + interpolate(top, size=lateral.shape[-2:], mode=mode)``
    in one pass.

    Args:
        lateral: (N, C_in, H, W), NCHW or channels_last (the output follows it).
        weight: (C_out, C_in, 1, 1) or (C_out, C_in).
        bias: (C_out,) or None.
        top: (N, C_out, h, w), any h, w.
        mode: "nearest" or "nearest-exact", as in ``F.interpolate``.
        scale_factor: None, or the float (or (h, w) pair) passed to ``F.interpolate`` instead
            of a size; ``floor(h * scale)`` must equal H (and likewise for W).
        backend: "auto" or one of :func:`fpn_kernels.available_backends`.
    """
    sf = validate(lateral, weight, bias, top, mode, scale_factor)
    lateral, weight, bias, top = _autocast(lateral, weight, bias, top)
    name = _resolve(backend, lateral)
    backends.announce_missing_once()
    if lateral.shape[0] == 0:
        # N = 0, the one empty size validate() lets through (as eager does): eager's own empty
        # output, and its autograd for the (zero or empty) gradients, so no backend's forward
        # or backward ever runs on nothing.
        return upsample_add_conv1x1_reference(lateral, weight, bias, top, mode, sf)
    return _upsample_add_conv1x1(lateral, weight, bias, top, mode, sf, name)
