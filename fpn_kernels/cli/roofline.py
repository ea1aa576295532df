"""The work of one top-down level for `bench`: GEMM FLOPs, the bytes each implementation moves
(a model), and the roofline time at a machine's measured peaks.

Forward bytes are :func:`fpn_kernels.triton.roofline.bytes_moved` (DESIGN.md's eager and fused
formulas). For ``fwd+bwd`` rows this module adds the backward of ``grad_out``, element size
``e``, ``HW`` = lateral pixels, ``hw`` = top pixels:

* eager  ~ e * (4*N*Co*HW                   [grad_out read by conv's input grad, weight grad,
                                             bias grad and the upsample's backward]
               + N*Ci*HW + Co*Ci            [lateral and weight read]
               + N*Ci*HW + Co*Ci            [grad_lateral, grad_weight written]
               + 2*N*Co*hw)                 [grad_top zero-filled, then accumulated]
* fused  ~ e * (N*Co*HW + N*Ci*HW + Co*Ci   [grad_out, lateral, weight read once]
               + N*Ci*HW + Co*Ci + N*Co*hw) [every gradient written once]

FLOPs count the GEMMs only: ``2*N*Co*Ci*HW`` per GEMM, one forward, two backward (grad_lateral,
grad_weight); the adds and the nearest gather are O(N*Co*HW), noise beside them.
"""

from __future__ import annotations

from ..triton.roofline import bytes_moved as forward_bytes
from .cases import DIRECTIONS, Level


def gemm_flops(level: Level, direction: str) -> int:
    per_gemm = 2 * level.n * level.c_out * level.c_in * level.pixels
    return per_gemm * {"fwd": 1, "fwd+bwd": 3}[direction]


def bytes_moved(level: Level, element_size: int, fused: bool, direction: str) -> int:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    eager_forward, fused_forward = forward_bytes(level, element_size)
    if direction == "fwd":
        return fused_forward if fused else eager_forward
    n, c_in, c_out = level.n, level.c_in, level.c_out
    lateral, weight = n * c_in * level.pixels, c_out * c_in
    out, top = n * c_out * level.pixels, n * c_out * level.top_pixels
    if fused:
        backward = (out + lateral + weight) + (lateral + weight + top)
        return fused_forward + backward * element_size
    backward = 4 * out + (lateral + weight) + (lateral + weight) + 2 * top
    return eager_forward + backward * element_size


def roofline_ms(flops: float, nbytes: float, peak_gflops: float, peak_gbps: float) -> float:
    """The time no implementation can beat at these peaks: the slower of compute and memory."""
    return max(flops / (peak_gflops * 1e6), nbytes / (peak_gbps * 1e6))
