"""The "cuda" backend: the fused CUDA kernels in csrc/cuda (torch.ops.fpn_kernels.fused_* on
CUDA tensors).

``fpn_kernels._C_cuda`` only adds CUDA implementations to the schemas that ``fpn_kernels._C``
defines, so ``_C`` is loaded first. The calls themselves are the "cpu" backend's: the same two
ops, and the dispatcher picks the kernel by the tensors' device.
"""

from __future__ import annotations

import torch

from . import _cpp
from ._cpu_backend import backward, forward

__all__ = ["backward", "forward", "unavailable_reason"]


def unavailable_reason() -> str | None:
    for name in ("_C", "_C_cuda"):  # the schemas first, then their CUDA kernels
        reason = _cpp.load(name)
        if reason is not None:
            return reason
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no CUDA device or driver)"
    return None
