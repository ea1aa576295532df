"""The Triton backend's correctness matrix, shared by the interpreter run (CPU tensors under
TRITON_INTERPRET=1, tests/test_triton_interpret.py) and the GPU run (tests/test_triton_gpu.py).

Every case runs the public op with ``backend="triton"`` forward and backward (through the custom
op's autograd) and compares output and all four gradients with eager autograd on identical
leaves, per-dtype tolerances from conftest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from conftest import assert_close, make_inputs

from fpn_kernels import upsample_add_conv1x1, upsample_add_conv1x1_reference
from fpn_kernels.indexing import aten_index_kernel
from fpn_kernels.ops import is_channels_last
from fpn_kernels.reference import upsample_add_conv1x1_reference_backward


@dataclass(frozen=True)
class Case:
    n: int
    c_in: int
    c_out: int
    out_hw: tuple[int, int]
    top_hw: tuple[int, int]
    mode: str = "nearest"
    scale_factor: tuple[float, float] | None = None
    bias: bool = True

    def __str__(self) -> str:
        sf = f"-sf{self.scale_factor[0]}x{self.scale_factor[1]}" if self.scale_factor else ""
        return (f"n{self.n}-{self.c_in}to{self.c_out}-{self.top_hw[0]}x{self.top_hw[1]}"
                f"to{self.out_hw[0]}x{self.out_hw[1]}-{self.mode}{sf}"
                f"{'' if self.bias else '-nobias'}")


# Odd and non-2x sizes on both axes (10->19, 38->75, 7->7, 1->5, top larger than lateral, an
# exact 2x), channel counts that are not multiples of 8 (3, 17, 33) crossing the interpreter's
# 16-wide tiles, N = 1..3, bias None, "nearest-exact", scale factors (a per-axis pair; one with
# out == 2 * in, where ATen's CPU kernels disagree: the channels_last one short-cuts to
# dst >> 1, the generic one, taken for an NCHW top when out_h + out_w > 128, computes
# floorf(dst / 2.05)). 4->110 "nearest-exact" is another size where the two CPU kernels differ.
CASES = [
    Case(2, 33, 17, (19, 75), (10, 38)),
    Case(2, 17, 33, (19, 75), (10, 38), mode="nearest-exact", bias=False),
    Case(1, 3, 17, (7, 5), (7, 1)),
    Case(2, 17, 3, (7, 5), (7, 1), mode="nearest-exact"),
    Case(2, 33, 17, (5, 7), (9, 12)),  # top larger than lateral: some top pixels get no grad
    Case(1, 17, 33, (12, 16), (6, 8), bias=False),  # exactly 2x
    Case(1, 17, 17, (20, 122), (10, 61), scale_factor=(2.05, 2.01)),
    Case(1, 3, 17, (19, 110), (10, 4), mode="nearest-exact"),
    Case(3, 3, 33, (15, 22), (10, 11), mode="nearest-exact", scale_factor=(1.5, 2.0)),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_case(case: Case, dtype: torch.dtype, channels_last: bool, device: str,
             seed: int = 0) -> None:
    def inputs(requires_grad: bool):
        return make_inputs(case.n, case.c_in, case.c_out, case.out_hw, case.top_hw, dtype=dtype,
                           channels_last=channels_last, bias=case.bias,
                           requires_grad=requires_grad, seed=seed, device=device)

    fused_in = inputs(requires_grad=True)
    lateral, weight, bias, top = inputs(requires_grad=False)
    kwargs = dict(mode=case.mode, scale_factor=case.scale_factor)
    out = upsample_add_conv1x1(*fused_in, backend="triton", **kwargs)
    expected = upsample_add_conv1x1_reference(lateral, weight, bias, top, **kwargs)
    assert_close(out, expected, msg=f"{case} forward")
    # The output follows lateral's layout; with one channel a channels_last lateral is also
    # plainly contiguous, and then (like conv2d) the output is NCHW.
    layout = torch.channels_last if is_channels_last(fused_in[0]) else torch.contiguous_format
    assert out.is_contiguous(memory_format=layout), "output must follow lateral's layout"

    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed + 1))
    grad_out = grad_out.to(device=device, dtype=dtype).contiguous(memory_format=layout)
    # The spec's gradients (grad_top: the exact adjoint of the gather eager's forward ran).
    index_kernel = aten_index_kernel(top, case.out_hw)
    expected_grads = upsample_add_conv1x1_reference_backward(
        grad_out, lateral, weight, case.top_hw, case.mode, case.scale_factor,
        vectorized_upsample=index_kernel == "cpu_channels_last",
    )
    names = ("lateral", "weight", "bias", "top")
    leaves = [(name, leaf, want) for name, leaf, want
              in zip(names, fused_in, expected_grads, strict=True) if leaf is not None]
    grads = torch.autograd.grad(out, [leaf for _, leaf, _ in leaves], grad_out)
    # atol grows like the square root of the number of terms each gradient sums.
    pixels = case.out_hw[0] * case.out_hw[1]
    terms = {"lateral": case.c_out, "weight": case.n * pixels, "bias": case.n * pixels,
             "top": max(1, math.ceil(pixels / (case.top_hw[0] * case.top_hw[1])))}
    for (name, leaf, want), got in zip(leaves, grads, strict=True):
        assert_close(got, want.reshape(leaf.shape), scale=math.sqrt(terms[name]),
                     msg=f"{case} grad_{name}")
