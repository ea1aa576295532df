"""Differential-testing helpers for the reliability tests (fuzz, autocast, threads, determinism,
memory): the op pinned to a backend, the eager oracle (forward, and gradients with the exact
adjoint for ``top``), forward + backward in one call, and a comparison with conftest's per-dtype
tolerances that also checks NaN and Inf positions."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from conftest import assert_close
from torch import Tensor

from fpn_kernels import upsample_add_conv1x1, upsample_add_conv1x1_reference

INPUT_NAMES = ("lateral", "weight", "bias", "top")


def op(backend: str) -> Callable[..., Tensor]:
    """The public op pinned to one backend, called like the eager reference."""
    return functools.partial(upsample_add_conv1x1, backend=backend)


def eager(lateral, weight, bias, top, *, mode="nearest", scale_factor=None) -> Tensor:
    return upsample_add_conv1x1_reference(lateral, weight, bias, top, mode, scale_factor)


def eager_gather(lateral, weight, bias, top, *, mode="nearest", scale_factor=None) -> Tensor:
    """Eager's output values, with the upsample written as the gather eager's ``F.interpolate``
    performs, so autograd gives its exact adjoint for ``top`` (the spec's gradient; ATen's own
    CPU upsample backward is not that adjoint when its forward took the generic kernel). The
    gather is probed through ``F.interpolate`` on a tensor with ``top``'s shape and strides (so
    ATen picks the same kernel) holding pixel numbers, in float64 math for float64 and float32
    otherwise."""
    n, c, h, w = top.shape
    math_dtype = torch.float64 if top.dtype == torch.float64 else torch.float32
    probe = torch.empty_strided(top.shape, top.stride(), dtype=math_dtype)
    probe.copy_(torch.arange(h * w, dtype=math_dtype).reshape(1, 1, h, w).expand(n, c, h, w))
    if scale_factor is None:
        mapped = F.interpolate(probe, size=lateral.shape[-2:], mode=mode)
    else:
        mapped = F.interpolate(probe, scale_factor=scale_factor, mode=mode)
    src = mapped[0, 0].reshape(-1).long()
    assert torch.equal(mapped, src.to(math_dtype).reshape(mapped.shape[2:]).expand_as(mapped))
    # Sum the adjoint in float32 for half types (one rounding), as a careful kernel does.
    gathered = top.to(math_dtype).flatten(2)[:, :, src].to(top.dtype)
    c_out, c_in = weight.shape[:2]
    lat = F.conv2d(lateral, weight.reshape(c_out, c_in, 1, 1), bias)
    return lat + gathered.reshape(mapped.shape)


def forward_backward(
    fn: Callable[..., Tensor], inputs: Sequence[Tensor | None], grad_out: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``out = fn(*inputs, **kwargs)`` and, when ``grad_out`` is given, the gradient of
    ``<out, grad_out>`` for every input that requires grad, by name."""
    out = fn(*inputs, **kwargs)
    wanted = [(name, t) for name, t in zip(INPUT_NAMES, inputs, strict=True)
              if t is not None and t.requires_grad]
    if grad_out is None or not wanted:
        return out, {}
    grads = torch.autograd.grad(out, [t for _, t in wanted], grad_out)
    return out, {name: g for (name, _), g in zip(wanted, grads, strict=True)}


def gradient_scales(c_out: int, n: int, out_hw: Sequence[int],
                    top_hw: Sequence[int]) -> dict[str, float]:
    """How far each gradient's atol widens: the square root of the number of unit-scale terms it
    sums (its values, and their rounding errors, grow like that)."""
    pixels = out_hw[0] * out_hw[1]
    # Destinations reading one top pixel, at most (nearest runs are ceil(out/in) long, +1 for
    # the uneven runs of scale factors and "nearest-exact").
    readers = (math.ceil(out_hw[0] / top_hw[0]) + 1) * (math.ceil(out_hw[1] / top_hw[1]) + 1)
    return {
        "lateral": math.sqrt(c_out),
        "weight": math.sqrt(n * pixels),
        "bias": math.sqrt(n * pixels),
        "top": math.sqrt(readers),
    }


def assert_matches(actual: Tensor, expected: Tensor, *, dtype: torch.dtype | None = None,
                   scale: float = 1.0, msg: str = "") -> None:
    """``actual`` has eager's dtype, shape, NaN and +-Inf positions, and its finite values are
    within the per-dtype tolerance (``dtype`` overrides which dtype's, e.g. under autocast)."""
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    for what, where in (("NaN", torch.isnan), ("+Inf", torch.isposinf), ("-Inf", torch.isneginf)):
        ours, theirs = where(actual), where(expected)
        if not torch.equal(ours, theirs):
            raise AssertionError(
                f"{msg}: {what} positions differ: ours only at {(ours & ~theirs).nonzero()[:5]}, "
                f"eager only at {(theirs & ~ours).nonzero()[:5]}"
            )
    finite = torch.isfinite(expected)
    assert_close(actual[finite], expected[finite], dtype or expected.dtype, scale=scale, msg=msg)
