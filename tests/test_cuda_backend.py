"""The "cuda" backend (csrc/cuda, fpn_kernels/_cuda_backend.py).

Without a GPU (these run in CI): the built library registers CUDA kernels for both schemas, no
kernel of it spills registers (cuobjdump on the built .so), and backend selection picks "cuda"
for CUDA tensors when Triton is unavailable. With a GPU (``-m gpu``): forward and backward against
the eager reference in float64 over sizes, modes, scale factors, layouts, dtypes; bit-exact
index checks; determinism; CUDA graph capture (kernels on the current stream); the Triton backend.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import torch_switch
from fused_calls import fused_backward, fused_forward

import fpn_kernels
from fpn_kernels import _cpp, _cuda_backend, backends
from fpn_kernels.precision import cudnn_conv_allows_tf32
from fpn_kernels.reference import (
    upsample_add_conv1x1_reference,
    upsample_add_conv1x1_reference_backward,
)

# --------------------------------------------------------------------------- the built library


def _why_cuda_is_not_built() -> str | None:
    """setup.py builds fpn_kernels._C_cuda whenever torch has CUDA and nvcc exists: None then,
    else the reason it is legitimately absent."""
    if torch.version.cuda is None:
        return "torch has no CUDA (a CPU-only build), so setup.py skips fpn_kernels._C_cuda"
    from torch.utils import cpp_extension

    homes = [cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    if not shutil.which("nvcc") and not any(
        h and os.path.exists(os.path.join(h, "bin", "nvcc")) for h in homes
    ):
        return "nvcc was not found, so setup.py skips fpn_kernels._C_cuda"
    return None


@pytest.fixture(scope="module")
def cuda_library() -> str:
    """Path of the built fpn_kernels._C_cuda, loaded (after _C, which defines the schemas)."""
    spec = importlib.util.find_spec("fpn_kernels._C_cuda")
    if spec is None or spec.origin is None:
        reason = _why_cuda_is_not_built()
        if reason is not None:
            pytest.skip(reason)
        pytest.fail(
            "fpn_kernels._C_cuda was not built although torch has CUDA and nvcc exists "
            "(pip install --no-build-isolation -e .)"
        )
    assert _cpp.load("_C") is None
    assert _cpp.load("_C_cuda") is None
    return spec.origin


def test_cuda_kernels_registered_by_the_cuda_library(cuda_library):
    # In a fresh process: _C alone has no CUDA kernel; loading _C_cuda adds both.
    script = (
        "import importlib.util, torch\n"
        "has = lambda op: torch._C._dispatch_has_kernel_for_dispatch_key("
        "'fpn_kernels::' + op, 'CUDA')\n"
        "torch.ops.load_library(importlib.util.find_spec('fpn_kernels._C').origin)\n"
        "print(has('fused_forward'), has('fused_backward'))\n"
        f"torch.ops.load_library({cuda_library!r})\n"
        "print(has('fused_forward'), has('fused_backward'))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True", "True"]
    for op in ("fused_forward", "fused_backward"):  # and in this process
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fpn_kernels::{op}", "CUDA")


def _cuobjdump() -> str | None:
    from torch.utils import cpp_extension

    candidates = [
        os.path.join(h, "bin", "cuobjdump")
        for h in (cpp_extension.CUDA_HOME, os.environ.get("CUDA_HOME"), "/usr/local/cuda")
        if h
    ]
    candidates.append(shutil.which("cuobjdump") or "")
    triton = importlib.util.find_spec("triton")  # Triton ships one
    if triton is not None and triton.origin is not None:
        candidates.append(
            os.path.join(os.path.dirname(triton.origin), "backends", "nvidia", "bin", "cuobjdump")
        )
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def parse_resource_usage(text: str) -> dict[str, dict[str, dict[str, int]]]:
    """``cuobjdump --dump-resource-usage`` -> {arch: {mangled kernel: {REG: n, LOCAL: n, ...}}}."""
    usage: dict[str, dict[str, dict[str, int]]] = {}
    arch, kernel = None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch = m.group(1)
            usage.setdefault(arch, {})
        elif m := re.match(r"\s*Function (\S+):", line):
            kernel = m.group(1)
        elif kernel and arch and "REG:" in line:
            usage[arch][kernel] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            kernel = None
    return usage


# Kernel templates and their instantiations (dtype, the fp32 split-K partials of the
# fp16/bf16 grad_weight, and fp32 as TF32 or IEEE), per architecture.
EXPECTED_KERNELS = {"gemm_kernel": 6, "grad_top_kernel": 3, "sum_chunks_kernel": 3}


def test_no_kernel_spills_registers(cuda_library):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found (CUDA toolkit bin/ or Triton's bundled copy)")
    out = subprocess.run(
        [tool, "--dump-resource-usage", cuda_library], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    usage = parse_resource_usage(out.stdout)
    assert usage, f"no device code found in {cuda_library}:\n{out.stdout}"
    for arch, kernels in usage.items():
        for template, count in EXPECTED_KERNELS.items():
            found = [k for k in kernels if template in k]
            assert len(found) == count, f"{arch}: expected {count} {template}s, got {found}"
        for kernel, res in kernels.items():
            # Spilled registers live in local memory (and a stack frame): both must be 0.
            assert res["LOCAL"] == 0 and res["STACK"] == 0, f"{arch} {kernel}: {res}"
            assert 0 < res["REG"] <= 255, f"{arch} {kernel}: {res}"


def _sass_by_kernel(tool: str, library: str) -> dict[tuple[str, str], str]:
    """``cuobjdump -sass`` -> {(arch, mangled kernel): its SASS}."""
    text = subprocess.run([tool, "-sass", library], capture_output=True, text=True,
                          check=True).stdout
    sass: dict[tuple[str, str], str] = {}
    arch, kernel = None, None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = (sm_\w+)", line):
            arch, kernel = m.group(1), None
        elif m := re.match(r"\s*Function : (\S+)", line):
            kernel = m.group(1)
            sass[(arch, kernel)] = ""
        elif kernel is not None:
            sass[(arch, kernel)] += line + "\n"
    return sass


def test_fp32_gemms_run_as_tf32_or_ieee(cuda_library):
    # gemm_kernel<float, float, Tf32>: Tf32 = true multiplies on tensor cores as TF32 (what
    # eager's cuDNN conv does under torch's default flags), false with FMA only (IEEE fp32).
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found (CUDA toolkit bin/ or Triton's bundled copy)")
    fp32 = {key: code for key, code in _sass_by_kernel(tool, cuda_library).items()
            if "gemm_kernelIffLb" in key[1]}
    assert len(fp32) == 2 * len({arch for arch, _ in fp32}), sorted(fp32)
    for (arch, kernel), code in fp32.items():
        if "Lb1" in kernel:
            assert re.search(r"HMMA\.\w+\.F32\.TF32", code), f"{arch}: no TF32 MMA in {kernel}"
        else:
            assert "HMMA" not in code, f"{arch}: the IEEE fp32 GEMM uses tensor cores"


def test_parse_resource_usage():
    text = (
        "arch = sm_80\n Function _Z1fv:\n  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:364\n"
        "arch = sm_90\n Function _Z1fv:\n  REG:38 STACK:8 SHARED:0 LOCAL:4 CONSTANT[0]:364\n"
    )
    usage = parse_resource_usage(text)
    assert usage["sm_80"]["_Z1fv"]["REG"] == 40 and usage["sm_80"]["_Z1fv"]["LOCAL"] == 0
    assert usage["sm_90"]["_Z1fv"]["LOCAL"] == 4 and usage["sm_90"]["_Z1fv"]["STACK"] == 8


# --------------------------------------------------------------------------- availability


def test_unavailable_reason_follows_cuda_availability(cuda_library, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch.cuda.is_available() is False" in _cuda_backend.unavailable_reason()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _cuda_backend.unavailable_reason() is None


def _set_state(monkeypatch, backend: backends.Backend, reason: str | None, impl=None) -> None:
    monkeypatch.setattr(backend, "_loaded", True)
    monkeypatch.setattr(backend, "_reason", reason)
    monkeypatch.setattr(backend, "_impl", impl)


def test_auto_picks_cuda_when_triton_is_missing(cuda_library, monkeypatch):
    # Triton reports unavailable; the cuda backend re-evaluates its availability with
    # torch.cuda faked available (selection only: no CUDA tensor is created).
    _set_state(monkeypatch, backends.BACKENDS["triton"], "simulated: triton is not installed")
    cuda = backends.BACKENDS["cuda"]
    _set_state(monkeypatch, cuda, None)
    monkeypatch.setattr(cuda, "_loaded", False)  # evaluate again, under the fake
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    gpu = torch.device("cuda")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert backends.select_backend("auto", gpu, dtype) == "cuda"
        assert backends.select_backend("cuda", gpu, dtype) == "cuda"
    assert cuda.impl is _cuda_backend
    # fp64 is not a CUDA-kernel dtype: auto falls through to eager, an explicit request raises.
    assert backends.select_backend("auto", gpu, torch.float64) == "eager"
    with pytest.raises(backends.BackendUnavailableError, match="dtype torch.float64"):
        backends.select_backend("cuda", gpu, torch.float64)
    # CPU tensors never go to the CUDA kernels.
    assert backends.select_backend("auto", torch.device("cpu"), torch.float32) != "cuda"
    # With Triton available, it keeps its place in front of cuda.
    _set_state(monkeypatch, backends.BACKENDS["triton"], None, impl=object())
    assert backends.select_backend("auto", gpu, torch.float16) == "triton"


def test_cuda_backend_reports_why_without_a_gpu(cuda_library):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    reason = backends.BACKENDS["cuda"].unavailable_reason
    assert reason is not None and "torch.cuda.is_available() is False" in reason
    gpu = torch.device("cuda")
    with pytest.raises(backends.BackendUnavailableError, match="cuda.is_available"):
        backends.select_backend("cuda", gpu, torch.float32)


# --------------------------------------------------------------------------- with a GPU

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Max |error| / max(1, max |reference|) against float64, per operand precision: fp32
# accumulation plus one rounding of the result (fp16: 2^-11, bf16: 2^-8 relative), with margin.
# fp32 runs as TF32 when torch.backends.cudnn lets conv2d use it (the default; operands rounded
# to fp16's 10-bit mantissa, so fp16's tolerance), else as IEEE fp32. A wrong index, a dropped
# bias or a missed K tile is O(1) on this scale.
TOLERANCE = {"fp32-ieee": 2e-5, "fp32-tf32": 2e-3, "fp16": 2e-3, "bf16": 1e-2}


def precision(dtype: torch.dtype) -> str:
    """The key of TOLERANCE the GPU backends compute ``dtype`` in, under torch's flags now."""
    if dtype == torch.float32:
        return "fp32-tf32" if cudnn_conv_allows_tf32() else "fp32-ieee"
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


@pytest.fixture
def ieee_fp32():
    """fp32 as IEEE in both GPU backends (and eager): the tight fp32 tolerance holds."""
    with torch_switch(torch.backends.cudnn, "allow_tf32", False):
        yield

# (N, C_in, C_out, H, W, h, w, scale_factor)
CASES = [
    (2, 3, 5, 7, 9, 3, 4, None),  # tiny and odd: nothing fills a tile
    (1, 64, 64, 16, 16, 8, 8, None),  # tile-aligned 2x
    (2, 70, 130, 33, 65, 17, 33, None),  # remainders in M, N and K; several K tiles
    (1, 16, 24, 10, 10, 10, 10, None),  # same size
    (1, 8, 16, 20, 20, 10, 10, [2.05, 2.05]),  # odd scale: ATen CUDA has no 2x short-cut
    (1, 4, 6, 31, 17, 7, 5, [4.5, 3.5]),  # fractional scale factors
    (1, 5, 7, 6, 9, 12, 18, None),  # top larger than lateral: skipped sources
    (2, 40, 48, 50, 100, 25, 50, None),  # 5000 pixels: several grad_weight chunks per image
    # ATen's CUDA upsample backward (ceilf of the inverse scale) is not the exact adjoint of its
    # forward here: rows 2 -> 41 ("nearest-exact"), columns 2 -> 82 ("nearest").
    (1, 3, 4, 41, 82, 2, 2, None),
]
CASE_IDS = [f"{c[0]}x{c[1]}->{c[2]}@{c[3]}x{c[4]}<-{c[5]}x{c[6]}/{c[7]}" for c in CASES]


def _make(case, dtype, channels_last, bias=True, device="cuda", seed=0):
    n, c_in, c_out, h, w, th, tw, _ = case
    g = torch.Generator(device="cpu").manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    lateral = rand(n, c_in, h, w).contiguous(memory_format=fmt)
    top = rand(n, c_out, th, tw).contiguous(memory_format=fmt)
    weight = rand(c_out, c_in, 1, 1)
    return lateral, weight, (rand(c_out) if bias else None), top


def _interpolate(x: torch.Tensor, out_hw, mode: str, scale_factor) -> torch.Tensor:
    if scale_factor is None:
        return F.interpolate(x, size=tuple(out_hw), mode=mode)
    return F.interpolate(x, scale_factor=tuple(scale_factor), mode=mode)


def _exact_grad_top(grad_out: torch.Tensor, top_hw, mode: str, scale_factor) -> torch.Tensor:
    """The exact adjoint of eager's forward gather on grad_out's device, in float64: every
    destination pixel adds its gradient to the top pixel that F.interpolate read for it (found
    by interpolating top's pixel numbers). ATen's own CUDA backward is not always this."""
    n, c, h, w = grad_out.shape
    numbers = torch.arange(top_hw[0] * top_hw[1], dtype=torch.float64, device=grad_out.device)
    source = _interpolate(numbers.reshape(1, 1, *top_hw), (h, w), mode, scale_factor)
    grad_top = torch.zeros(n, c, top_hw[0] * top_hw[1], dtype=torch.float64, device=grad_out.device)
    grad_top.index_add_(2, source.reshape(-1).long(), grad_out.double().reshape(n, c, h * w))
    return grad_top.reshape(n, c, *top_hw)


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == dtype, what
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    err = (actual.double() - expected).abs().max().item() / scale if expected.numel() else 0.0
    assert err <= TOLERANCE[precision(dtype)], (
        f"{what} ({precision(dtype)}): max error {err:.3g} x {scale:.3g}")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.usefixtures("ieee_fp32")
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_the_reference(case, mode, channels_last, dtype):
    sf = case[7]
    with_bias = CASES.index(case) % 2 == 0  # half the cases without a bias
    lateral, weight, bias, top = _make(case, dtype, channels_last, bias=with_bias)
    inputs = [t for t in (lateral, weight, bias, top) if t is not None]
    for t in inputs:
        t.requires_grad_(True)
    out = fpn_kernels.upsample_add_conv1x1(
        lateral, weight, bias, top, mode=mode, scale_factor=sf, backend="cuda"
    )
    assert out.is_contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    d = [t.detach().double() if t is not None else None for t in (lateral, weight, bias, top)]
    expected = upsample_add_conv1x1_reference(*d, mode=mode, scale_factor=sf)
    _assert_close(out.detach(), expected, dtype, "out")

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    g_lat, g_w, g_b, _ = upsample_add_conv1x1_reference_backward(
        grad_out.double(), d[0], d[1], top.shape[2:], mode, sf
    )
    g_top = _exact_grad_top(grad_out, top.shape[2:], mode, sf)
    expected_grads = [g_lat, g_w.reshape(weight.shape)] + ([g_b] if with_bias else []) + [g_top]
    names = ["grad_lateral", "grad_weight"] + (["grad_bias"] if with_bias else []) + ["grad_top"]
    for name, got, want in zip(names, grads, expected_grads, strict=True):
        _assert_close(got, want, dtype, name)


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_indices_match_eager_exactly(case, mode, channels_last, dtype):
    # weight = 0, no bias: out is exactly the upsampled top, bit for bit. Small-integer
    # grad_out: every window sum is exact, so grad_top equals the exact adjoint bit for bit.
    lateral, weight, _, top = _make(case, dtype, channels_last, bias=False)
    sf = case[7]
    out = fused_forward(lateral, torch.zeros_like(weight[:, :, 0, 0]), None, top, mode, sf,
                        channels_last)
    assert torch.equal(out, _interpolate(top, lateral.shape[2:], mode, sf))

    g = torch.Generator().manual_seed(2)
    grad_out = torch.empty_like(out).copy_(torch.randint(-4, 5, out.shape, generator=g))
    _, _, _, grad_top = fused_backward(
        grad_out, lateral, weight[:, :, 0, 0].contiguous(), top.shape[2:], mode, sf,
        channels_last, [False, False, False, True],
    )
    assert torch.equal(grad_top.double(), _exact_grad_top(grad_out, top.shape[2:], mode, sf))


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_deterministic(channels_last, dtype):
    case = (3, 96, 80, 60, 90, 30, 45, None)  # several chunks, K and M tiles
    lateral, weight, _, _ = _make(case, dtype, channels_last)
    w2d = weight[:, :, 0, 0].contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad_out = torch.randn(3, 80, 60, 90, device="cuda", dtype=dtype).contiguous(memory_format=fmt)
    args = (grad_out, lateral, w2d, [30, 45], "nearest", None, channels_last, [True] * 4)
    first = fused_backward(*args)
    for _ in range(3):
        again = fused_backward(*args)
        for a, b in zip(first, again, strict=True):
            assert torch.equal(a, b)


@requires_gpu
@pytest.mark.gpu
def test_runs_on_the_current_stream_under_graph_capture():
    # A launch on any stream other than the current one breaks stream capture.
    lateral, weight, bias, top = _make(CASES[2], torch.float16, False)
    w2d = weight[:, :, 0, 0].contiguous()
    args = (lateral, w2d, bias, top, "nearest", None, False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = fused_forward(*args)
        grad_out = torch.ones_like(eager)
        bargs = (grad_out, lateral, w2d, list(top.shape[2:]), "nearest", None, False, [True] * 4)
        eager_grads = fused_backward(*bargs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fused_forward(*args)
        captured_grads = fused_backward(*bargs)
    captured.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    for a, b in zip(captured_grads, eager_grads, strict=True):
        assert torch.equal(a, b)


@requires_gpu
@pytest.mark.gpu
def test_runs_on_the_tensors_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    lateral, weight, bias, top = _make(CASES[2], torch.float32, False, device="cuda:1")
    with torch.cuda.device(0):
        out = fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top, backend="cuda")
    assert out.device == lateral.device
    d = [t.double() for t in (lateral, weight, bias, top)]
    _assert_close(out, upsample_add_conv1x1_reference(*d), torch.float32, "out")


@requires_gpu
@pytest.mark.gpu
def test_direct_calls_reject_bad_arguments():
    lateral, weight, bias, top = _make(CASES[0], torch.float32, False)
    w2d = weight[:, :, 0, 0].contiguous()
    fused = fused_forward
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        fused(lateral.double(), w2d.double(), None, top.double(), "nearest", None, False)
    with pytest.raises(RuntimeError, match="expected every tensor on cuda"):
        fused(lateral, w2d.cpu(), None, top, "nearest", None, False)
    with pytest.raises(RuntimeError, match="mode"):
        fused(lateral, w2d, bias, top, "bilinear", None, False)
    with pytest.raises(RuntimeError, match="contiguous"):
        fused(lateral, w2d, bias, top, "nearest", None, True)


@requires_gpu
@pytest.mark.gpu
def test_opcheck():
    lateral, weight, bias, top = _make(CASES[2], torch.float32, True)
    for t in (lateral, weight, bias, top):
        t.requires_grad_(True)
    torch.library.opcheck(
        torch.ops.fpn_kernels.upsample_add_conv1x1.default,
        (lateral, weight, bias, top, "nearest", None, "cuda"),
    )


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_the_triton_backend(channels_last, dtype, tf32):
    # One fp32 rule for both GPU backends: under either flag setting they agree within the
    # tolerance of the precision that setting selects (fp16/bf16 ignore the flag).
    if dtype != torch.float32 and tf32:
        pytest.skip("the TF32 flag concerns fp32 only")
    with torch_switch(torch.backends.cudnn, "allow_tf32", tf32):
        _compare_with_triton(channels_last, dtype)


def _compare_with_triton(channels_last, dtype):
    reason = backends.BACKENDS["triton"].unavailable_reason
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    names = ("out", "grad_lateral", "grad_weight", "grad_bias", "grad_top")
    for case in CASES:
        lateral, weight, bias, top = _make(case, dtype, channels_last)
        results = {}
        for name in ("cuda", "triton"):
            inputs = [t.detach().clone().requires_grad_(True) for t in (lateral, weight, bias, top)]
            out = fpn_kernels.upsample_add_conv1x1(
                *inputs, mode="nearest", scale_factor=case[7], backend=name
            )
            grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
            results[name] = (out, *grads)
        for what, a, b in zip(names, *results.values(), strict=True):
            # Both differ from the exact answer by at most one tolerance.
            scale = max(1.0, b.abs().max().item())
            err = (a.double() - b.double()).abs().max().item() / scale
            assert err <= 2 * TOLERANCE[precision(dtype)], (
                f"{case} {what} ({precision(dtype)}): {err:.3g}")


@requires_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fp32_follows_cudnn_allow_tf32(backend, channels_last):
    # C_in = 1024 (ResNet-50-FPN's P4): TF32's 10-bit mantissa gives errors near 1e-3 here, IEEE
    # near 1e-6, so each comparison fails if the kernel picked the other precision.
    reason = backends.BACKENDS[backend].unavailable_reason
    if reason is not None:
        pytest.skip(f"{backend} backend unavailable: {reason}")
    g = torch.Generator().manual_seed(0)
    lateral, top = torch.randn(2, 1024, 50, 76, generator=g), torch.randn(2, 256, 25, 38,
                                                                          generator=g)
    weight, bias = torch.randn(256, 1024, 1, 1, generator=g) / 32, torch.randn(256, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    lateral, top = (t.contiguous(memory_format=fmt) for t in (lateral, top))
    exact = upsample_add_conv1x1_reference(lateral.double(), weight.double(), bias.double(),
                                           top.double())
    inputs = [t.cuda() for t in (lateral, weight, bias, top)]
    for allowed in (False, True):
        with torch_switch(torch.backends.cudnn, "allow_tf32", allowed):
            out = fpn_kernels.upsample_add_conv1x1(*inputs, backend=backend)
        error = (out.double().cpu() - exact).abs().max().item()
        if allowed:
            assert 1e-4 < error < 2e-2, f"{backend}: TF32 expected, max error {error}"
        else:
            assert error < 1e-4, f"{backend}: IEEE fp32 expected, max error {error}"


@requires_gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_offsets_beyond_int32():
    # 4 x 23200^2 output elements > 2^31: every offset past the int32 range must be right.
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs a GPU with 24 GiB")
    side = 23200
    options = {"device": "cuda", "dtype": torch.float16}
    lateral = torch.randn(1, 2, side, side, **options)
    top = torch.randn(1, 4, side // 2, side // 2, **options)
    weight, bias = torch.randn(4, 2, 1, 1, **options), torch.randn(4, **options)
    out = fpn_kernels.upsample_add_conv1x1(lateral, weight, bias, top, backend="cuda")
    assert out.numel() > 2**31
    # The reference on row slices: the first rows, and the last (past 2^31 in the last channel);
    # eager's source of each destination row/column: interpolate the numbers 0..h-1.
    numbers = torch.arange(side // 2, dtype=torch.float64, device="cuda").reshape(1, 1, -1, 1)
    src = F.interpolate(numbers, size=(side, 1), mode="nearest").reshape(-1).long()
    for rows in (slice(0, 4), slice(side - 4, side)):
        up = top[:, :, src[rows]][:, :, :, src]
        expected = F.conv2d(lateral[:, :, rows].double(), weight.double(), bias.double())
        _assert_close(out[:, :, rows], expected + up.double(), torch.float16, str(rows))
    w2d = weight[:, :, 0, 0].contiguous()
    grad_top = fused_backward(
        torch.ones_like(out), lateral, w2d, [side // 2, side // 2], "nearest", None, False,
        [False, False, False, True],
    )[3]
    assert torch.equal(grad_top, torch.full_like(grad_top, 4))  # each 2x2 window
