"""One FPN top-down level, forward and forward + backward, per implementation (see conftest)."""

from __future__ import annotations


def test_forward(bench_level, case: str, backend: str) -> None:
    bench_level(case, backend, "fwd")


def test_forward_backward(bench_level, case: str, backend: str) -> None:
    bench_level(case, backend, "fwd+bwd")
