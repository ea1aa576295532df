"""The "triton" backend: Triton kernels for CUDA tensors (and, under ``TRITON_INTERPRET=1``, for
CPU tensors, as a correctness tool).

Importing this package does not import triton: ``unavailable_reason()`` says plainly why the
backend cannot run, and ``roofline`` (the bytes model) works without triton. The kernels live in
``kernels.py`` (with their configs), the launches in ``launch.py``, the ahead-of-time compile
checks in ``aot.py``.
"""

from __future__ import annotations

import os


def unavailable_reason() -> str | None:
    """None when the kernels can run here, else why not. When they can, they are recorded as
    the ops' Triton kernels for torch's compile caches (``graph.record_kernels``): the backend is
    loaded, through this call, before any compile that may decompose an op into them."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken install is as unavailable as a missing one
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if os.environ.get("TRITON_INTERPRET") != "1":
        import torch

        if not torch.cuda.is_available():
            return ("no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on CPU tensors for "
                    "testing)")
    from . import graph

    graph.record_kernels()
    return None


def _on_device(t):
    """Triton launches on the current CUDA device and its stream: make that ``t``'s device
    (like the CUDA backend's CUDAGuard), or nothing for CPU tensors under the interpreter."""
    import contextlib

    import torch

    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def forward(lateral, weight, bias, top, mode, scale_factor, channels_last, index_kernel):
    from .launch import forward

    with _on_device(lateral):
        return forward(lateral, weight, bias, top, mode, scale_factor, channels_last,
                       index_kernel)


def backward(grad_out, lateral, weight, top_hw, mode, scale_factor, channels_last, index_kernel,
             needs):
    from .launch import backward

    with _on_device(lateral):
        return backward(grad_out, lateral, weight, top_hw, mode, scale_factor, channels_last,
                        index_kernel, needs)
