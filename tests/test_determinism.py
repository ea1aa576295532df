"""Determinism: forward and backward give the same bits on every run (whatever the memory
addresses), and run, with the same bits, under ``torch.use_deterministic_algorithms(True)``."""

from __future__ import annotations

import contextlib

import pytest
import torch
from _differential import forward_backward, op
from conftest import fused_backends, make_inputs

OUTPUTS = ("out", "lateral", "weight", "bias", "top")

# Several tiles, pixel chunks and C_out row blocks per call; an odd scale factor on a size where
# ATen's generic upsample kernel runs; gradients for only some inputs.
CASES = {
    "fpn-exact-2x": dict(shape=(2, 24, 72, (40, 60), (20, 30)), mode="nearest-exact",
                         scale_factor=2.0, requires_grad=(True, True, True, True)),
    "odd-scale-wide": dict(shape=(2, 9, 33, (20, 151), (10, 74)), mode="nearest",
                           scale_factor=(2.0, 2.05), requires_grad=(True, True, True, True)),
    "some-grads-no-bias": dict(shape=(3, 17, 40, (19, 33), (7, 11)), mode="nearest", bias=False,
                               scale_factor=None, requires_grad=(False, True, False, True)),
}


def run(backend: str, case: str, dtype: torch.dtype, channels_last: bool) -> list[torch.Tensor]:
    spec = CASES[case]
    n, c_in, c_out, out_hw, top_hw = spec["shape"]
    inputs = make_inputs(n, c_in, c_out, out_hw, top_hw, dtype=dtype,
                         channels_last=channels_last, bias=spec.get("bias", True))
    for t, wanted in zip(inputs, spec["requires_grad"], strict=True):
        if t is not None:
            t.requires_grad_(wanted)
    grad_out = torch.randn(n, c_out, *out_hw, generator=torch.Generator().manual_seed(1))
    out, grads = forward_backward(op(backend), inputs, grad_out.to(dtype), mode=spec["mode"],
                                  scale_factor=spec["scale_factor"])
    return [out, *grads.values()]


@contextlib.contextmanager
def deterministic_algorithms():
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)  # raises on any op without a deterministic path
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def assert_bitwise_equal(first: list[torch.Tensor], again: list[torch.Tensor], what: str) -> None:
    assert len(first) == len(again)
    for name, a, b in zip(OUTPUTS, first, again, strict=False):
        assert torch.equal(a, b), f"{what}: {name} differs ({(a - b).abs().max()} at most)"


backend_dtype_layout = [
    pytest.mark.parametrize("backend", fused_backends("cpu")),
    pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16,
                                      torch.float16], ids=str),
    pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"]),
    pytest.mark.parametrize("case", list(CASES)),
]


def with_matrix(test):
    for mark in backend_dtype_layout:
        test = mark(test)
    return test


@with_matrix
def test_repeated_runs_are_bitwise_equal(backend, dtype, channels_last, case):
    first = run(backend, case, dtype, channels_last)
    for size in (1, 4097, 123_457):  # move the next run's buffers to other addresses
        held = torch.empty(size, dtype=torch.uint8)
        assert_bitwise_equal(first, run(backend, case, dtype, channels_last),
                             f"rerun after holding {held.numel()} bytes")


@with_matrix
def test_deterministic_algorithms_mode(backend, dtype, channels_last, case):
    free = run(backend, case, dtype, channels_last)
    with deterministic_algorithms():
        strict = run(backend, case, dtype, channels_last)
    assert_bitwise_equal(free, strict, "under use_deterministic_algorithms(True)")
