"""The cpu backend's float32 GEMMs on oneDNN's brgemm (csrc/cpu/f32_gemm.h): on exactly the
CPUs with AVX-512 but no AMX, with oneDNN enabled; right against eager in both passes and both
layouts (forward and grad_lateral tiles, grad_weight panels), close to the MKL path every other
machine runs (``mkldnn_enabled(False)`` selects it here), and of fixed bits whatever the thread
count."""

from __future__ import annotations

import pytest
import torch
from conftest import fused_backends
from test_bf16_gemm import (
    assert_run_matches_eager,
    assert_same_bits_on_1_and_2_threads,
    cpu_flags,
    mkldnn_enabled,
    run_shape,
)

import fpn_kernels

pytestmark = pytest.mark.skipif("cpu" not in fused_backends("cpu"),
                                reason="the cpu backend is not built")


def f32_brgemm() -> bool:
    return bool(torch.ops.fpn_kernels.cpu_f32_brgemm())


needs_brgemm = pytest.mark.skipif(not f32_brgemm(),
                                  reason="this CPU has no AVX-512, or has AMX (MKL runs there)")


def test_brgemm_path_is_on_exactly_where_the_cpu_has_avx512_but_no_amx():
    flags = cpu_flags()
    want = ("avx512f" in flags and "amx_bf16" not in flags
            and torch.backends.mkldnn.is_available())
    assert f32_brgemm() == want
    with mkldnn_enabled(False):
        assert not f32_brgemm()
        assert "float32 GEMMs via at::mm (MKL" in fpn_kernels.backend_report()
    if want:
        assert "float32 GEMMs via oneDNN's brgemm (AVX-512)" in fpn_kernels.backend_report()


# (n, c_in, c_out, out_hw, top_hw): R50 channel counts at small sizes, and tails in every block
# of the ukernel calls and transposes (channels_last: 64-row blocks of pixels, 128-column
# blocks of C_out / C_in: 200 = 128 + 72; NCHW: 64-row blocks of C_out / C_in, 200 = 3 x 64 +
# 8, 128-column blocks of a tile's pixels, 975 = 7 x 128 + 79 and 195 = 128 + 67; grad_weight's
# 256-pixel panels, channels_last: 128-row blocks, 2 x 2145 = 16 x 256 + 194 pixels; NCHW:
# 128-column blocks of C_in, 2145 = 8 x 256 + 97 pixels per image; 16 x 16 transposes with 2-
# and 8-wide edges), C_in 2 (k = 2).
CASES = {
    "r50_p4_channels": (1, 1024, 256, (13, 76), (7, 38)),
    "tails": (2, 48, 200, (33, 65), (17, 33)),
    "wide_c_in": (1, 300, 72, (9, 20), (5, 10)),
    "c_in_2": (1, 2, 3, (4, 4), (2, 2)),
}


def run_case(case: str, channels_last: bool = True):
    return run_shape(CASES[case], channels_last, torch.float32, grad_channels_last=channels_last)


layouts = pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])


@layouts
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("native", [pytest.param(True, marks=needs_brgemm), False],
                         ids=["brgemm", "mkl"])
def test_float32_matches_eager(case, native, channels_last):
    with mkldnn_enabled(native):
        assert f32_brgemm() == native
        inputs, grad_out, (out, grads) = run_case(case, channels_last)
        # eager's fp32 conv leaves oneDNN too without mkldnn: the oracle under the same switch
        assert_run_matches_eager(CASES[case], inputs, grad_out, (out, grads))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=memory_format)


@needs_brgemm
@layouts
def test_brgemm_and_mkl_agree_to_float32_rounding(channels_last):
    results = {}
    for native in (True, False):
        with mkldnn_enabled(native):
            _, _, results[native] = run_case("r50_p4_channels", channels_last)
    (out, grads), (mkl_out, mkl_grads) = results[True], results[False]
    # Same products, other summation orders over k = 1024 (forward) / 256 (grad_lateral) /
    # 988 pixels (grad_weight: 256-pixel panels against MKL's one chunk).
    torch.testing.assert_close(out, mkl_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["lateral"], mkl_grads["lateral"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["weight"], mkl_grads["weight"], rtol=1e-5, atol=1e-4)


@needs_brgemm
@layouts
@pytest.mark.parametrize("case", ["tails", "r50_p4_channels"])
def test_brgemm_bits_do_not_depend_on_thread_count(case, channels_last):
    assert_same_bits_on_1_and_2_threads(lambda: run_case(case, channels_last)[2])
