"""One FPN top-down level, forward and forward + backward, per implementation (see conftest)."""

from __future__ import annotations


def test_forward(bench_level, case: str, backend: str) -> None:
    bench_level(case, backend, "fwd")


def test_forward_backward(bench_level, case: str, backend: str) -> None:
    bench_level(case, backend, "fwd+bwd")


def test_matrix_forward(bench_level, case: str, backend: str, dtype: str, layout: str) -> None:
    """P4 and P2 in every (dtype, layout): where a CPU speed regression would show first."""
    bench_level(case, backend, "fwd", dtype, layout)


def test_matrix_forward_backward(bench_level, case: str, backend: str, dtype: str,
                                 layout: str) -> None:
    bench_level(case, backend, "fwd+bwd", dtype, layout)
