"""The cpu backend's bfloat16 GEMMs on oneDNN's brgemm (csrc/cpu/bf16_gemm.h): on AMX tiles
exactly where the CPU has AMX-BF16, with AVX512-BF16 where it has that but no AMX, with oneDNN
enabled; right against eager, and the same as the fp32 fallback that every other machine runs
(``mkldnn_enabled(False)`` selects it here).

Where the CPU has neither, the brgemm-path tests skip and say so; the fallback tests still run."""

from __future__ import annotations

import pytest
import torch
from _differential import assert_matches, eager_gather, forward_backward, gradient_scales, op
from conftest import fused_backends, make_inputs, torch_switch

import fpn_kernels

pytestmark = pytest.mark.skipif("cpu" not in fused_backends("cpu"),
                                reason="the cpu backend is not built")


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f
                         if line.startswith("flags")), set())
    except OSError:
        return set()


def expected_isa() -> str:
    """What the brgemm path should run on, read from the CPU's flags (not from the extension)."""
    flags = cpu_flags()
    if not torch.backends.mkldnn.is_available():
        return ""
    if "amx_bf16" in flags:
        return "amx_bf16"
    return "avx512_bf16" if "avx512_bf16" in flags else ""


def bf16_gemm_isa() -> str:
    return str(torch.ops.fpn_kernels.cpu_bf16_gemm_isa())


def brgemm() -> bool:
    return bf16_gemm_isa() != ""


def mkldnn_enabled(enabled: bool):
    # Not torch.backends.mkldnn.flags(): it also sets oneDNN's TF32 switch, which warns on
    # builds without Intel GPU support.
    return torch_switch(torch.backends.mkldnn, "enabled", enabled)


needs_brgemm = pytest.mark.skipif(not brgemm(), reason="this CPU has no AMX-BF16 or AVX512-BF16")


def test_brgemm_path_is_on_exactly_where_the_cpu_has_it():
    assert bf16_gemm_isa() == expected_isa()
    with mkldnn_enabled(False):
        assert bf16_gemm_isa() == ""
    assert bf16_gemm_isa() == expected_isa()  # a disabled first call is not cached


def test_backend_report_says_how_bfloat16_multiplies():
    report = fpn_kernels.backend_report()
    assert f"at::mm (MKL, {torch.backends.cpu.get_cpu_capability()} on this CPU)" in report
    want = {"amx_bf16": "bfloat16 GEMMs on AMX tiles via oneDNN's brgemm",
            "avx512_bf16": "bfloat16 GEMMs on AVX512-BF16 (VDPBF16PS) via oneDNN's brgemm",
            "": "bfloat16 GEMMs as float32"}[bf16_gemm_isa()]
    assert want in report
    with mkldnn_enabled(False):
        assert "bfloat16 GEMMs as float32: torch.backends.mkldnn is disabled" in (
            fpn_kernels.backend_report())


# (n, c_in, c_out, out_hw, top_hw): R50-FPN channel counts at small sizes; tails in every
# blocked dimension (C_out 72 = 64 + 8 columns, 33-pixel rows, several 1024-pixel tiles); odd
# reductions, which the brgemm path leaves to the fp32 GEMM (odd C_in: forward; odd C_out:
# grad_lateral).
CASES = {
    "r50_p4_channels": (1, 1024, 256, (13, 76), (7, 38)),
    "r50_p2_channels": (2, 256, 256, (40, 66), (20, 33)),
    "tails": (2, 48, 72, (33, 65), (17, 33)),
    "odd_c_in": (1, 5, 64, (9, 20), (5, 10)),
    "odd_c_out": (1, 32, 7, (9, 20), (5, 10)),
    "c_in_2": (1, 2, 3, (4, 4), (2, 2)),
}


def run_shape(shape, channels_last: bool, dtype: torch.dtype, grad_channels_last: bool = False):
    """Inputs of ``shape`` (n, c_in, c_out, out_hw, top_hw), a grad_out, and the cpu backend's
    (out, grads) for them."""
    n, c_in, c_out, out_hw, top_hw = shape
    inputs = make_inputs(n, c_in, c_out, out_hw, top_hw, dtype=dtype,
                         channels_last=channels_last, requires_grad=True)
    grad_out = torch.randn(n, c_out, *out_hw, generator=torch.Generator().manual_seed(3))
    grad_out = grad_out.to(dtype)
    if grad_channels_last:
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    return inputs, grad_out, forward_backward(op("cpu"), inputs, grad_out)


def assert_run_matches_eager(shape, inputs, grad_out, result) -> None:
    """A run_shape result against eager's output and gradients, at the per-dtype tolerances
    (gradients scaled by their reduction lengths)."""
    out, grads = result
    want_out, want_grads = forward_backward(eager_gather, inputs, grad_out)
    assert_matches(out, want_out, msg="forward")
    n, _, c_out, out_hw, top_hw = shape
    scales = gradient_scales(c_out, n, out_hw, top_hw)
    for name, grad in grads.items():
        assert_matches(grad, want_grads[name], scale=scales[name], msg=f"grad_{name}")


def run_case(case: str, channels_last: bool):
    return run_shape(CASES[case], channels_last, torch.bfloat16)


def assert_same_bits_on_1_and_2_threads(run) -> None:
    """``run()`` -> (out, grads) gives the same bits with 1 and 2 intra-op threads."""
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, grads = run()
            runs.append({"out": out, **grads})
    finally:
        torch.set_num_threads(before)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_brgemm), False],
                         ids=["brgemm", "fp32-gemm"])
def test_bfloat16_matches_eager(case, channels_last, native):
    with mkldnn_enabled(native):
        assert brgemm() == native
        result = run_case(case, channels_last)
    assert_run_matches_eager(CASES[case], *result)


@needs_brgemm
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_brgemm_and_fp32_gemm_agree_to_the_rounding(channels_last):
    """Both accumulate exact bf16 products in fp32 and round once; only the order of the fp32
    sums differs, so outputs differ by at most one bf16 ulp, and rarely."""
    results = {}
    for native in (True, False):
        with mkldnn_enabled(native):
            _, _, results[native] = run_case("r50_p2_channels", channels_last)
    pairs = [("out", results[True][0], results[False][0])]
    pairs += [(f"grad_{name}", results[True][1][name], results[False][1][name])
              for name in ("lateral", "weight")]
    for name, fast, slow in pairs:
        ulp = torch.finfo(torch.bfloat16).eps * slow.float().abs().clamp_min(1.0)
        assert ((fast.float() - slow.float()).abs() <= ulp).all(), name
        assert (fast != slow).float().mean() < 0.01, name


@needs_brgemm
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", ["tails", "r50_p2_channels", "r50_p4_channels"])
def test_brgemm_bits_do_not_depend_on_thread_count(case, channels_last):
    """grad_weight's owners on 2 threads against 1 owner on 1 thread. "tails" has 2145 pixels
    per image: the 1024-pixel chunks end in an odd 97-pixel chunk, whose last pixel goes to the
    fp32 rank-1 update; its 48 input channels are one column block, so on 2 threads
    grad_weight's 72 rows go to two owners (rows 0-63 and 64-71). On 2 threads channels_last
    "r50_p2_channels" (C_in <= 2 C_out) splits rows first (0-127, 128-255), "r50_p4_channels"
    (C_in 1024) and every NCHW case with more than one column block split column blocks."""
    assert_same_bits_on_1_and_2_threads(lambda: run_case(case, channels_last)[2])


@needs_brgemm
@pytest.mark.parametrize("case", ["tails", "odd_c_out", "r50_p2_channels"])
def test_brgemm_grad_weight_has_the_same_bits_in_both_layouts(case):
    """channels_last grad_weight transposes grad_out (bf16_gemm::transpose: 16 x 16 word
    transposes in registers, masked row tails, an odd last channel) to the operand NCHW reads
    in place, and packs lateral (cpublas::pack on AMX, its own interleave without AMX; column
    tails of 48 and 8) to the block NCHW packs from its transpose: the same GEMMs, so the same
    bits, unless a transpose or a pack puts an element in the wrong place. grad_bias sums the
    same interleaved lanes in both layouts."""
    grads = {}
    for channels_last in (False, True):
        _, _, (_, grads[channels_last]) = run_case(case, channels_last)
    assert torch.equal(grads[False]["weight"], grads[True]["weight"])
    assert torch.equal(grads[False]["bias"], grads[True]["bias"])
