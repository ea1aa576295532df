"""The CPU kernels' cache of freed output buffers (csrc/cpu/output_cache.cpp).

The fused CPU forward and backward write their large outputs (``out``, ``grad_lateral``;
blocks of 1 MiB and more) into memory that a dead output of an earlier call left mapped, instead
of fresh pages whose first-touch faults would cost up to a third of the kernel. At most
``limit_bytes`` of freed blocks are kept (default 512 MiB, or ``FPN_KERNELS_CPU_OUTPUT_CACHE_MB``
read at the first CPU call); the oldest are released first. Live outputs are not counted.
Like torch's CUDA caching allocator, the memory stays with the process until released.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import BACKENDS


@dataclass(frozen=True)
class CpuOutputCacheInfo:
    limit_bytes: int  # the most bytes of freed blocks kept
    cached_bytes: int  # bytes of freed blocks kept now
    cached_blocks: int
    live_bytes: int  # bytes of blocks backing live outputs
    hits: int  # outputs served from a cached block
    misses: int  # outputs that needed a fresh block


def _ops():
    BACKENDS["cpu"].impl  # noqa: B018 - loads the extension, or raises saying why it is missing
    return torch.ops.fpn_kernels


def cpu_output_cache_info() -> CpuOutputCacheInfo:
    """What the cache holds now, and its hits and misses since the process started."""
    return CpuOutputCacheInfo(*_ops().cpu_output_cache_stats())


def set_cpu_output_cache_limit(limit_bytes: int) -> int:
    """Keep at most ``limit_bytes`` of freed output blocks (0: keep none); frees the oldest
    blocks above it now. Returns the previous limit."""
    if isinstance(limit_bytes, bool) or not isinstance(limit_bytes, int):
        raise TypeError(f"limit_bytes: expected an int, got {type(limit_bytes).__name__}")
    if limit_bytes < 0:
        raise ValueError(f"limit_bytes: expected >= 0, got {limit_bytes}")
    return int(_ops().set_cpu_output_cache_limit(limit_bytes))


def empty_cpu_output_cache() -> None:
    """Release every cached block (live outputs are untouched); the limit stays."""
    set_cpu_output_cache_limit(set_cpu_output_cache_limit(0))
