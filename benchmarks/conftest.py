"""The benchmark suite's cases: the ResNet-50-FPN levels (800x1216, N=2) and the seed's TinyFPN
levels, fp32 NCHW, for every implementation `bench` times (eager, torch.compile, each backend).

    pytest benchmarks --benchmark-only --benchmark-group-by=param:case   # backends side by side
    pytest benchmarks --benchmark-only --benchmark-autosave              # then, after a change:
    pytest benchmarks --benchmark-only --benchmark-compare                # regressions vs saved

Under ``--benchmark-disable`` (``make test``) each benchmark is a smoke test: it runs once on a
small level of the same structure (``Level.smoke``), and torch.compile uses the "aot_eager"
compiler (dynamo + AOTAutograd, no inductor codegen: inductor costs ~2-8 s per shape on this
2-core machine, which the enabled benchmarks and `python -m fpn_kernels bench` pay). Every run,
smoke or timed, checks its result against eager.
"""

from __future__ import annotations

import pytest
import torch

from fpn_kernels.cli import cases
from fpn_kernels.cli.check import compare, gradient_scale, tolerance

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32
CASES = {
    **{f"r50-{lv.name}": lv for lv in cases.preset_levels(cases.DEFAULT_PRESET)},
    **{f"seed-{lv.name}": lv for lv in cases.preset_levels("seed")},
}
IMPLS = [cases.EAGER, cases.COMPILE, *cases.backend_impls(DEVICE, DTYPE)]
# The regression matrix: the first and last R50 levels (GEMM-bound P4, memory-heavy P2) in
# every (dtype, layout) the CPU speed goals name.
MATRIX_CASES = ["r50-P4", "r50-P2"]
MATRIX_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MATRIX_LAYOUTS = {"nchw": False, "channels_last": True}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Parameter names `case` and `backend`: --benchmark-group-by=param:case groups by them.
    if "dtype" in metafunc.fixturenames:  # the (dtype, layout) matrix
        metafunc.parametrize("case", MATRIX_CASES)
        metafunc.parametrize("layout", list(MATRIX_LAYOUTS))
        params = [(d, b) for d, dtype in MATRIX_DTYPES.items()
                  for b in [cases.EAGER, cases.COMPILE, *cases.backend_impls(DEVICE, dtype)]]
        metafunc.parametrize(("dtype", "backend"), params, ids=[f"{d}-{b}" for d, b in params])
        return
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", list(CASES))
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", IMPLS)


def _synchronized(fn):
    if DEVICE != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out

    return call


@pytest.fixture
def bench_level(benchmark):
    """``bench_level(case, backend, direction)``: benchmark one implementation on one level,
    then check its output (and gradients) against eager on the same inputs."""

    def run(case: str, backend: str, direction: str, dtype: str = "float32",
            layout: str = "nchw") -> None:
        smoke = benchmark.disabled
        level = CASES[case].smoke() if smoke else CASES[case]
        backward = direction == "fwd+bwd"
        torch_dtype, channels_last = MATRIX_DTYPES[dtype], MATRIX_LAYOUTS[layout]
        inputs = cases.make_inputs(level, torch_dtype, channels_last, DEVICE,
                                   requires_grad=backward)
        grad_out = (cases.make_grad_out(level, torch_dtype, channels_last, DEVICE)
                    if backward else None)

        reference = cases.step(cases.make_impl(cases.EAGER, DEVICE), inputs, direction, grad_out)
        expected = [reference().detach()] + [t.grad for t in inputs if backward]

        impl = cases.make_impl(backend, DEVICE, compiler="aot_eager" if smoke else "inductor")
        fn = _synchronized(cases.step(impl, inputs, direction, grad_out))
        if not smoke:
            fn()  # compiles torch.compile: not part of the timing
        benchmark.group = f"{direction} {case} {dtype} {layout}"
        benchmark.extra_info.update(level=level.describe(), direction=direction,
                                    gemm_gflop=2 * level.n * level.c_out * level.c_in
                                    * level.pixels / 1e9)
        out = benchmark(fn)

        got = [out.detach()] + [t.grad for t in inputs if backward]
        names = ["out"] + (["lateral", "weight", "bias", "top"] if backward else [])
        for name, actual, want in zip(names, got, expected, strict=True):
            scale = 1.0 if name == "out" else gradient_scale(level, name)
            problem = compare(actual, want, tolerance(torch_dtype, DEVICE), scale=scale)
            assert problem is None, f"{backend} {case} {direction} {name}: {problem}"

    return run
