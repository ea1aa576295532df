"""Threads: the cpu backend's bits do not depend on the intra-op thread count, and concurrent
calls from several Python threads give correct results on every backend."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from _differential import assert_matches, eager_gather, forward_backward, gradient_scales, op
from conftest import fused_backends, make_inputs

import fpn_kernels

OUTPUTS = ("out", "lateral", "weight", "bias", "top")

# (n, c_in, c_out, out_hw, top_hw): several tiles, chunks and C_out row blocks per call, so work
# is split over threads; and GEMMs of the shapes BLAS likes to split along the reduction.
THREAD_CASES = {
    "fpn": (2, 24, 72, (40, 60), (20, 30)),
    "narrow_c_out": (1, 24, 16, (32, 32), (16, 16)),
    "deep_c_in": (1, 2048, 8, (8, 8), (4, 4)),
    "wide_rows": (2, 16, 40, (3, 1100), (2, 550)),
    "tiny": (1, 8, 8, (8, 8), (4, 4)),
    # R50-FPN channel counts: large GEMM blocks, which take MKL's unsliced path.
    "r50_p2_channels": (1, 256, 256, (32, 48), (16, 24)),
    "r50_p4_channels": (1, 1024, 256, (13, 76), (7, 38)),
}


# These shapes once showed MKL splitting a GEMM's reduction by its thread count (torch runs MKL
# with mkl_set_dynamic(false)); csrc/cpu gives GEMMs with small outputs their reduction in fixed
# slices (`matmul`), so every output must be bitwise equal between 1 and 2 threads.


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_kernels_get_every_intra_op_thread(restore_num_threads, threads):
    """at::parallel_for is compiled into the extension: built without the OpenMP that torch's
    parallel backend uses, it silently ran every tile on one thread (10-25% slower)."""
    if "cpu" not in fused_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    torch.set_num_threads(threads)
    assert torch.ops.fpn_kernels.cpu_parallel_threads() == threads
    report = fpn_kernels.backend_report()
    assert f"cpu     available (at::parallel_for on {threads} of {threads} intra-op" in report


def run(backend, case, dtype, channels_last):
    n, c_in, c_out, out_hw, top_hw = THREAD_CASES[case]
    inputs = make_inputs(n, c_in, c_out, out_hw, top_hw, dtype=dtype,
                         channels_last=channels_last, requires_grad=True)
    grad_out = torch.randn(n, c_out, *out_hw, generator=torch.Generator().manual_seed(1))
    out, grads = forward_backward(op(backend), inputs, grad_out.to(dtype))
    return dict(zip(OUTPUTS, [out, *grads.values()], strict=True))


@pytest.fixture
def restore_num_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def thread_params():
    for case in THREAD_CASES:
        for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            yield pytest.param(case, dtype, id=f"{case}-{dtype}")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case, dtype", list(thread_params()))
def test_cpu_bits_do_not_depend_on_thread_count(restore_num_threads, case, dtype, channels_last):
    if "cpu" not in fused_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    results = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results[threads] = run("cpu", case, dtype, channels_last)
    differing = [name for name in OUTPUTS if not torch.equal(results[1][name], results[2][name])]
    assert not differing, f"{differing} differ between 1 and 2 threads"


# Jobs with their own shapes, dtypes, layouts, modes and scale factors, run concurrently.
JOBS = [
    dict(n=2, c_in=5, c_out=7, out_hw=(10, 19), top_hw=(5, 10), dtype=torch.float32),
    dict(n=1, c_in=16, c_out=40, out_hw=(33, 40), top_hw=(16, 20), dtype=torch.float64,
         channels_last=True),
    dict(n=2, c_in=8, c_out=3, out_hw=(20, 30), top_hw=(10, 15), dtype=torch.bfloat16,
         scale_factor=2.05, mode="nearest-exact"),
    dict(n=3, c_in=3, c_out=9, out_hw=(7, 5), top_hw=(9, 12), dtype=torch.float16, bias=False),
    dict(n=1, c_in=12, c_out=24, out_hw=(2, 1100), top_hw=(1, 550), dtype=torch.float32,
         channels_last=True, mode="nearest-exact"),
]


@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_concurrent_calls_from_python_threads(backend):
    """4 Python threads, 40 calls (each job 8 times), all starting together; every result is
    checked against eager (forward and all gradients)."""
    def inputs(job):
        shape = {k: job[k] for k in ("n", "c_in", "c_out", "out_hw", "top_hw")}
        return make_inputs(**shape, dtype=job["dtype"], channels_last=job.get("channels_last"),
                           bias=job.get("bias", True), requires_grad=True, seed=len(shape))

    def grad_out(job):
        g = torch.Generator().manual_seed(7)
        return torch.randn(job["n"], job["c_out"], *job["out_hw"], generator=g).to(job["dtype"])

    def kwargs(job):
        return dict(mode=job.get("mode", "nearest"), scale_factor=job.get("scale_factor"))

    expected = [forward_backward(eager_gather, inputs(job), grad_out(job), **kwargs(job))
                for job in JOBS]
    start = threading.Barrier(4)

    def call(i):
        if i < 4:
            start.wait()
        job = JOBS[i % len(JOBS)]
        return i % len(JOBS), forward_backward(op(backend), inputs(job), grad_out(job),
                                               **kwargs(job))

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(call, range(8 * len(JOBS))))
    for j, (out, grads) in results:
        job = JOBS[j]
        want_out, want_grads = expected[j]
        assert_matches(out, want_out, msg=f"job {j} forward")
        scales = gradient_scales(job["c_out"], job["n"], job["out_hw"], job["top_hw"])
        assert grads.keys() == want_grads.keys()
        for name, grad in grads.items():
            assert_matches(grad, want_grads[name], scale=scales[name], msg=f"job {j} grad_{name}")
