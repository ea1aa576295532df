"""Backend registry: each backend states what it supports; dispatch is a thin lookup.

A backend is a module-like object with two functions over *normalized* inputs (the op in
``ops.py`` normalizes before calling; backends never see anything else):

``forward(lateral, weight, bias, top, mode, scale_factor, channels_last, index_kernel) -> out``
    ``lateral`` (N, C_in, H, W), ``top`` (N, C_out, h, w), both contiguous in the same memory
    format (channels_last iff ``channels_last``); ``weight`` (C_out, C_in) contiguous;
    ``bias`` (C_out,) or None; ``mode`` "nearest" | "nearest-exact"; ``scale_factor`` None or
    ``[scale_h, scale_w]``; ``index_kernel``: which ATen index computation to reproduce
    (``indexing.aten_index_kernel`` of the caller's ``top``). Returns ``out``
    (N, C_out, H, W) in ``lateral``'s memory format.

``backward(grad_out, lateral, weight, top_hw, mode, scale_factor, channels_last, index_kernel,
needs)``
    ``grad_out`` like ``out``; ``needs`` = 4 bools for (lateral, weight, bias, top). Returns
    ``(grad_lateral, grad_weight (C_out, C_in), grad_bias, grad_top)``, None where not needed.
    Deterministic: the same bits on every run, and (fused backends) for any thread count;
    the eager reference inherits ATen's conv, whose bits vary with the thread count.

Selection follows xformers: ``not_supported_reasons(...)`` lists why a backend cannot take the
inputs; ``backend="auto"`` takes the first backend with no reasons, an explicit backend raises
with its reasons instead of silently falling back.
"""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class BackendUnavailableError(ValueError):
    """A requested backend cannot run these inputs (the message says why)."""


@dataclass
class Backend:
    name: str
    module: str  # import path of the module that implements forward/backward
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    # Devices "auto" may pick this backend for; an explicit request may use any of `devices`.
    auto_devices: tuple[str, ...] | Callable[[], tuple[str, ...]] = ()
    _impl: ModuleType | None = field(default=None, repr=False)
    _reason: str | None = field(default=None, repr=False)
    _loaded: bool = field(default=False, repr=False)

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            impl = importlib.import_module(self.module)
            reason = impl.unavailable_reason() if hasattr(impl, "unavailable_reason") else None
        except Exception as exc:  # noqa: BLE001 - any import failure makes it unavailable
            impl, reason = None, f"{type(exc).__name__}: {exc}"
        if reason is None:
            self._impl = impl
        self._reason = reason

    @property
    def unavailable_reason(self) -> str | None:
        """None when this backend is installed and usable on this machine, else why not."""
        self._load()
        return self._reason

    @property
    def impl(self) -> Any:
        self._load()
        if self._impl is None:
            raise BackendUnavailableError(f"backend {self.name!r} is unavailable: {self._reason}")
        return self._impl

    def supported_devices(self, auto: bool) -> tuple[str, ...]:
        if not auto:
            return self.devices
        devices = self.auto_devices() if callable(self.auto_devices) else self.auto_devices
        return devices or self.devices

    def not_supported_reasons(
        self, device: torch.device, dtype: torch.dtype, auto: bool = False,
        channels_last: bool = False, c_in: int | None = None,
    ) -> list[str]:
        """Why this backend cannot take the inputs; with ``auto``, also why ``backend="auto"``
        leaves inputs it can run to a later backend (the impl's ``auto_declines`` rule on
        dtype, layout, ``c_in`` and the CPU's ISA: never a timing taken at run time)."""
        reasons = []
        if self.unavailable_reason is not None:
            reasons.append(f"not available: {self.unavailable_reason}")
        devices = self.supported_devices(auto)
        if device.type not in devices:
            reasons.append(f"device {device.type!r} not supported (supports {', '.join(devices)})")
        if dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            reasons.append(f"dtype {dtype} not supported (supports {names})")
        declines = getattr(self._impl, "auto_declines", None)
        if auto and not reasons and declines is not None:
            why = declines(dtype, channels_last, c_in)
            if why is not None:
                reasons.append(f"auto leaves these inputs to eager: {why}")
        return reasons


def _triton_auto_devices() -> tuple[str, ...]:
    # Under TRITON_INTERPRET=1 the Triton kernels also run on CPU tensors, but only when asked
    # for by name: the interpreter is a correctness tool, orders of magnitude slower than `cpu`.
    return ("cuda",)


def _triton_devices() -> tuple[str, ...]:
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


# Preference order: the first backend with no reasons wins under backend="auto".
BACKENDS: dict[str, Backend] = {
    b.name: b
    for b in (
        Backend(
            "triton",
            "fpn_kernels.triton",
            devices=_triton_devices(),
            dtypes=(torch.float16, torch.bfloat16, torch.float32),
            auto_devices=_triton_auto_devices,
        ),
        Backend(
            "cuda",
            "fpn_kernels._cuda_backend",
            devices=("cuda",),
            dtypes=(torch.float16, torch.bfloat16, torch.float32),
        ),
        Backend("cpu", "fpn_kernels._cpu_backend", devices=("cpu",), dtypes=FLOAT_DTYPES),
        Backend(
            "eager", "fpn_kernels._eager_backend", devices=("cpu", "cuda"), dtypes=FLOAT_DTYPES
        ),
    )
}


def available_backends() -> list[str]:
    """Backends installed and usable on this machine, in preference order."""
    return [name for name, b in BACKENDS.items() if b.unavailable_reason is None]


def backend_report() -> str:
    """One line per backend: available, or why not."""
    lines = []
    for name, b in BACKENDS.items():
        reason = b.unavailable_reason
        if reason is not None:
            lines.append(f"{name:7s} unavailable: {reason}")
        else:
            details = getattr(b.impl, "details", None)
            lines.append(f"{name:7s} available" + (f" ({details()})" if details else ""))
    return "\n".join(lines)


def select_backend(requested: str, device: torch.device, dtype: torch.dtype,
                   channels_last: bool = False, c_in: int | None = None) -> str:
    """Resolve ``requested`` ("auto" or a name) for inputs on ``device`` with ``dtype``, in
    ``channels_last`` layout or not, with ``c_in`` input channels (None: unknown)."""
    if not isinstance(requested, str):
        raise TypeError(f"backend: expected a str, got {type(requested).__name__}")
    if requested == "auto":
        all_reasons = {}
        for name, b in BACKENDS.items():
            reasons = b.not_supported_reasons(device, dtype, auto=True,
                                              channels_last=channels_last, c_in=c_in)
            if not reasons:
                return name
            all_reasons[name] = reasons
        detail = "; ".join(f"{n}: {', '.join(r)}" for n, r in all_reasons.items())
        raise BackendUnavailableError(
            f"backend: no backend supports {dtype} tensors on {device.type} ({detail})"
        )
    if requested not in BACKENDS:
        raise ValueError(
            f"backend: expected 'auto' or one of {list(BACKENDS)}, got {requested!r}"
        )
    reasons = BACKENDS[requested].not_supported_reasons(device, dtype, auto=False)
    if reasons:
        raise BackendUnavailableError(
            f"backend {requested!r} cannot run {dtype} tensors on {device.type}: "
            + "; ".join(reasons)
        )
    return requested


_announced = False


@torch.compiler.assume_constant_result
def announce_missing_once() -> None:
    """Say once, plainly, when the compiled extension is missing (the rest is expected)."""
    global _announced
    if _announced:
        return
    _announced = True
    reason = BACKENDS["cpu"].unavailable_reason
    if reason is not None:
        warnings.warn(
            "fpn_kernels: the compiled C++ extension is not available, so the fused CPU kernel "
            f"is missing ({reason}); CPU tensors fall back to the eager reference. Backends: "
            f"{available_backends()}. Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
