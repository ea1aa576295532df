"""HBM traffic of one FPN top-down merge, eager vs fused, and the time it implies: a MODEL.

Formulas (DESIGN.md, "Bytes moved"), element size ``e``, ``HW`` = lateral's pixels, ``hw`` =
top's pixels:

* eager = e * (N*Ci*HW + Co*Ci + N*Co*HW        conv2d: read lateral and weight, write lat
          + N*Co*hw + N*Co*HW                   interpolate: read top, write up
          + 3*N*Co*HW)                          add: read lat and up, write out
* fused = e * (N*Ci*HW + Co*Ci + N*Co*hw + N*Co*HW)   read lateral, weight, top; write out

A memory-bound level takes about bytes / bandwidth. These are lower bounds from a model, not
measurements: label them so wherever they are printed. No triton or GPU needed to import this.
"""

from __future__ import annotations

from typing import Protocol

H100_SXM_BANDWIDTH = 3.35e12  # bytes/s, HBM3
H200_BANDWIDTH = 4.8e12  # bytes/s, HBM3e


class LevelShape(Protocol):
    """One top-down merge: lateral (n, c_in, *out_hw) + top (n, c_out, *top_hw); e.g.
    ``fpn_kernels.cli.cases.Level``."""

    # Read-only members, so that frozen dataclasses (such as Level) implement the protocol.
    @property
    def n(self) -> int: ...
    @property
    def c_in(self) -> int: ...
    @property
    def c_out(self) -> int: ...
    @property
    def out_hw(self) -> tuple[int, int]: ...
    @property
    def top_hw(self) -> tuple[int, int]: ...


def bytes_moved(level: LevelShape, element_size: int) -> tuple[int, int]:
    """(eager, fused) HBM bytes of the forward merge of ``level``."""
    n, ci, co = level.n, level.c_in, level.c_out
    out_pixels = level.out_hw[0] * level.out_hw[1]
    top_pixels = level.top_hw[0] * level.top_hw[1]
    lateral, weight = n * ci * out_pixels, co * ci
    out, top = n * co * out_pixels, n * co * top_pixels
    eager = (lateral + weight + out) + (top + out) + 3 * out
    fused = lateral + weight + top + out
    return element_size * eager, element_size * fused


def roofline_seconds(nbytes: int, bandwidth: float = H100_SXM_BANDWIDTH) -> float:
    """The time to move ``nbytes`` at ``bandwidth`` bytes/s: the memory-bound lower bound."""
    return nbytes / bandwidth


def backward_bytes(level: LevelShape, element_size: int, splits: int) -> dict[str, int]:
    """HBM bytes of the Triton backward AS IMPLEMENTED (fpn_kernels/triton/launch.py), per
    launch, every gradient needed; L2 reuse between neighbouring tiles counts as free, so each
    launch reads an operand once:

    * grad_lateral  (forward kernel, weight^T, no epilogue): read grad_out, weight; write
      grad_lateral;
    * grad_weight + grad_bias partials (``conv1x1_weight_grad_kernel``): read grad_out, lateral;
      write ``splits`` fp32 rows of Co*Ci + Co;
    * ordered sum (``ordered_sum_kernel``, one launch for both): read the fp32 partials; write
      grad_weight, grad_bias;
    * grad_top (``nearest_upsample_grad_kernel``): read grad_out; write grad_top.

    So grad_out is read three times (once per launch that needs it), not once.
    """
    e = element_size
    n, ci, co = level.n, level.c_in, level.c_out
    out_pixels = level.out_hw[0] * level.out_hw[1]
    top_pixels = level.top_hw[0] * level.top_hw[1]
    grad_out, lateral = n * co * out_pixels, n * ci * out_pixels
    weight, top = co * ci, n * co * top_pixels
    partials = 4 * splits * (co * ci + co)
    return {
        "grad_lateral": e * (grad_out + weight + lateral),
        "grad_weight_partials": e * (grad_out + lateral) + partials,
        "ordered_sum": partials + e * (weight + co),
        "grad_top": e * (grad_out + top),
    }
