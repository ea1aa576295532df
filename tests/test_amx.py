"""The cpu backend's bfloat16 GEMMs on AMX tiles (csrc/cpu/amx_gemm.h): on exactly the machines
that have AMX-BF16 with oneDNN enabled, right against eager, and the same as the fp32 fallback
that every other machine runs (``mkldnn_enabled(False)`` selects it here).

Where the CPU has no AMX the AMX-path tests skip and say so; the fallback tests still run."""

from __future__ import annotations

import pytest
import torch
from _differential import assert_matches, eager_gather, forward_backward, gradient_scales, op
from conftest import fused_backends, make_inputs, torch_switch

import fpn_kernels

pytestmark = pytest.mark.skipif("cpu" not in fused_backends("cpu"),
                                reason="the cpu backend is not built")


def cpu_has_amx_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


def amx_gemm() -> bool:
    return bool(torch.ops.fpn_kernels.cpu_amx_bf16_gemm())


def mkldnn_enabled(enabled: bool):
    # Not torch.backends.mkldnn.flags(): it also sets oneDNN's TF32 switch, which warns on
    # builds without Intel GPU support.
    return torch_switch(torch.backends.mkldnn, "enabled", enabled)


needs_amx = pytest.mark.skipif(not cpu_has_amx_bf16(), reason="this CPU has no AMX-BF16")


def test_amx_path_is_on_exactly_where_the_cpu_has_it():
    assert amx_gemm() == (cpu_has_amx_bf16() and torch.backends.mkldnn.is_available())
    with mkldnn_enabled(False):
        assert not amx_gemm()


def test_backend_report_says_how_bfloat16_multiplies():
    report = fpn_kernels.backend_report()
    assert f"float32 GEMMs via at::mm (MKL, {torch.backends.cpu.get_cpu_capability()}" in report
    if amx_gemm():
        assert "bfloat16 GEMMs on AMX tiles" in report
    else:
        assert "bfloat16 GEMMs as float32" in report


# (n, c_in, c_out, out_hw, top_hw): R50-FPN channel counts at small sizes; tails in every
# blocked dimension (C_out 72 = 64 + 8 columns, 33-pixel rows, several 1024-pixel tiles); odd
# reductions, which the AMX path leaves to the fp32 GEMM (odd C_in: forward; odd C_out:
# grad_lateral).
CASES = {
    "r50_p4_channels": (1, 1024, 256, (13, 76), (7, 38)),
    "r50_p2_channels": (2, 256, 256, (40, 66), (20, 33)),
    "tails": (2, 48, 72, (33, 65), (17, 33)),
    "odd_c_in": (1, 5, 64, (9, 20), (5, 10)),
    "odd_c_out": (1, 32, 7, (9, 20), (5, 10)),
    "c_in_2": (1, 2, 3, (4, 4), (2, 2)),
}


def run_case(case: str, channels_last: bool):
    n, c_in, c_out, out_hw, top_hw = CASES[case]
    inputs = make_inputs(n, c_in, c_out, out_hw, top_hw, dtype=torch.bfloat16,
                         channels_last=channels_last, requires_grad=True)
    grad_out = torch.randn(n, c_out, *out_hw, generator=torch.Generator().manual_seed(3))
    grad_out = grad_out.to(torch.bfloat16)
    return inputs, grad_out, forward_backward(op("cpu"), inputs, grad_out)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("amx", [pytest.param(True, marks=needs_amx), False],
                         ids=["amx", "fp32-gemm"])
def test_bfloat16_matches_eager(case, channels_last, amx):
    with mkldnn_enabled(amx):
        assert amx_gemm() == amx
        inputs, grad_out, (out, grads) = run_case(case, channels_last)
    want_out, want_grads = forward_backward(eager_gather, inputs, grad_out)
    assert_matches(out, want_out, msg="forward")
    n, _, c_out, out_hw, top_hw = CASES[case]
    scales = gradient_scales(c_out, n, out_hw, top_hw)
    for name, grad in grads.items():
        assert_matches(grad, want_grads[name], scale=scales[name], msg=f"grad_{name}")


@needs_amx
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_amx_and_fp32_gemm_agree_to_the_rounding(channels_last):
    """Both accumulate exact bf16 products in fp32 and round once; only the order of the fp32
    sums differs, so outputs differ by at most one bf16 ulp, and rarely."""
    results = {}
    for amx in (True, False):
        with mkldnn_enabled(amx):
            _, _, results[amx] = run_case("r50_p2_channels", channels_last)
    pairs = [("out", results[True][0], results[False][0])]
    pairs += [(f"grad_{name}", results[True][1][name], results[False][1][name])
              for name in ("lateral", "weight")]
    for name, fast, slow in pairs:
        ulp = torch.finfo(torch.bfloat16).eps * slow.float().abs().clamp_min(1.0)
        assert ((fast.float() - slow.float()).abs() <= ulp).all(), name
        assert (fast != slow).float().mean() < 0.01, name


@needs_amx
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("case", ["tails", "r50_p2_channels"])
def test_amx_bits_do_not_depend_on_thread_count(case, channels_last):
    """"tails" has 2145 pixels per image: grad_weight's 1024-pixel chunks end in an odd
    97-pixel chunk, whose last pixel goes to the fp32 rank-1 update."""
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _, _, (out, grads) = run_case(case, channels_last)
            runs.append({"out": out, **grads})
    finally:
        torch.set_num_threads(before)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name


@needs_amx
@pytest.mark.parametrize("case", ["tails", "odd_c_out", "r50_p2_channels"])
def test_amx_grad_weight_has_the_same_bits_in_both_layouts(case):
    """channels_last grad_weight transposes grad_out (amx::transpose: 16-row gathers, masked
    row tails, an odd last channel) to the operand NCHW reads in place, and packs lateral to the
    block NCHW packs from its transpose: the same GEMMs, so the same bits, unless a transpose
    or a pack puts an element in the wrong place. grad_bias sums the same interleaved lanes in
    both layouts."""
    grads = {}
    for channels_last in (False, True):
        _, _, (_, grads[channels_last]) = run_case(case, channels_last)
    assert torch.equal(grads[False]["weight"], grads[True]["weight"])
    assert torch.equal(grads[False]["bias"], grads[True]["bias"])
