"""backend="auto" on CPU: the documented ISA rule that leaves GEMM-bound bfloat16 merges to
eager where eager's oneDNN convolution has native bfloat16 GEMMs and the fused kernel does not
(``fpn_kernels/_cpu_backend.py``: ``auto_declines``, with the measurements behind it)."""

from __future__ import annotations

import pytest
import torch

import fpn_kernels
from fpn_kernels import _cpu_backend, backends
from tests.conftest import make_inputs, torch_switch

CPU = torch.device("cpu")

pytestmark = pytest.mark.skipif(
    backends.BACKENDS["cpu"].unavailable_reason is not None, reason="needs the C++ extension")


@pytest.fixture
def isa(monkeypatch):
    """``isa(gemm=..., avx512_bf16=..., f32_brgemm=...)``: the CPU the rule sees; ``gemm`` is
    what the kernel's bf16 GEMMs run on ("amx_bf16", "avx512_bf16", or "" for fp32 copies),
    ``f32_brgemm`` whether its fp32 channels_last GEMMs run on oneDNN's brgemm (AVX-512, no
    AMX: the Zen 4 kind)."""

    def set_isa(gemm: str, avx512_bf16: bool, f32_brgemm: bool = False):
        monkeypatch.setattr(_cpu_backend, "_bf16_gemm_isa", lambda: gemm)
        monkeypatch.setattr(_cpu_backend, "_has_avx512_bf16", lambda: avx512_bf16)
        monkeypatch.setattr(_cpu_backend, "_f32_brgemm", lambda: f32_brgemm)

    return set_isa


def auto(dtype=torch.bfloat16, channels_last=False, c_in=1024):
    return backends.select_backend("auto", CPU, dtype, channels_last, c_in)


# (kernel's bf16 GEMM, avx512_bf16, channels_last, c_in) -> what auto picks for bfloat16
RULE = [
    # AVX512-BF16 but the kernel's GEMMs on fp32 copies (ATen's brgemm refused bf16): eager for
    # GEMM-bound levels in any layout
    ("", True, False, 1024, "eager"), ("", True, True, 512, "eager"),
    ("", True, False, 256, "cpu"), ("", True, True, 256, "cpu"),
    # Zen 4 kind: the kernel's GEMMs on AVX512-BF16 too: it keeps every level
    ("avx512_bf16", True, True, 1024, "cpu"), ("avx512_bf16", True, False, 512, "cpu"),
    # Sapphire Rapids kind: AMX: the kernel keeps every level
    ("amx_bf16", True, True, 1024, "cpu"), ("amx_bf16", True, False, 1024, "cpu"),
    ("amx_bf16", True, True, 256, "cpu"),
    # AVX2 only (Zen 3 kind): eager's bf16 conv is emulated there, the kernel always wins
    ("", False, False, 1024, "cpu"), ("", False, True, 2048, "cpu"),
]


@pytest.mark.parametrize(("gemm", "avx512_bf16", "channels_last", "c_in", "want"), RULE)
def test_auto_rule(isa, gemm, avx512_bf16, channels_last, c_in, want):
    isa(gemm=gemm, avx512_bf16=avx512_bf16)
    assert auto(channels_last=channels_last, c_in=c_in) == want
    # An explicit request is never overruled.
    assert backends.select_backend("cpu", CPU, torch.bfloat16, channels_last, c_in) == "cpu"


# (channels_last, c_in, f32_brgemm) -> what auto picks for float32
F32_RULE = [
    # Zen 4 kind: channels_last P4 (C_in 1024) and wider to eager, everything else fused
    (True, 1024, True, "eager"), (True, 2048, True, "eager"),
    (True, 512, True, "cpu"), (False, 1024, True, "cpu"), (False, 2048, True, "cpu"),
    # AMX Xeon kind and AVX2-only CPUs (MKL's GEMMs): every level fused
    (True, 1024, False, "cpu"), (False, 1024, False, "cpu"),
]


@pytest.mark.parametrize(("channels_last", "c_in", "f32_brgemm", "want"), F32_RULE)
def test_auto_rule_float32(isa, channels_last, c_in, f32_brgemm, want):
    isa(gemm="avx512_bf16", avx512_bf16=True, f32_brgemm=f32_brgemm)
    assert auto(dtype=torch.float32, channels_last=channels_last, c_in=c_in) == want
    assert backends.select_backend("cpu", CPU, torch.float32, channels_last, c_in) == "cpu"
    # The rule is float32's alone: bfloat16 with native GEMMs stays fused at every level.
    assert auto(channels_last=channels_last, c_in=c_in) == "cpu"
    with torch_switch(torch.backends.mkldnn, "enabled", False):
        assert auto(dtype=torch.float32, channels_last=channels_last, c_in=c_in) == "cpu"


def test_the_rule_is_bfloat16_only_and_needs_onednn(isa):
    isa(gemm="", avx512_bf16=True)
    for dtype in (torch.float32, torch.float64, torch.float16):
        assert auto(dtype=dtype) == "cpu"
    assert auto(c_in=None) == "cpu"  # unknown channels: no rule
    with torch_switch(torch.backends.mkldnn, "enabled", False):
        assert auto() == "cpu"  # eager's bf16 conv leaves oneDNN then: the kernel wins
    assert auto() == "eager"


def test_the_reason_is_reported(isa):
    isa(gemm="", avx512_bf16=True)
    reasons = backends.BACKENDS["cpu"].not_supported_reasons(CPU, torch.bfloat16, auto=True,
                                                             c_in=1024)
    assert any("run as float32 (ATen's brgemm refused them)" in r for r in reasons), reasons
    assert "leaves bfloat16 merges with C_in >= 512 (any layout)" in _cpu_backend.details()
    isa(gemm="amx_bf16", avx512_bf16=True)
    assert "leaves" not in _cpu_backend.details()
    isa(gemm="", avx512_bf16=False)
    assert "leaves" not in _cpu_backend.details()
    isa(gemm="avx512_bf16", avx512_bf16=True, f32_brgemm=True)
    assert "leaves float32 channels_last merges with C_in >= 1024" in _cpu_backend.details()
    assert "leaves bfloat16" not in _cpu_backend.details()
    reasons = backends.BACKENDS["cpu"].not_supported_reasons(
        CPU, torch.float32, auto=True, channels_last=True, c_in=1024)
    assert any("AVX-512 but no AMX" in r for r in reasons), reasons


def fused_kernel_calls(fn) -> int:
    with torch.profiler.profile() as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "fpn_kernels::fused_forward")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_the_op_follows_the_rule_end_to_end(isa, channels_last):
    isa(gemm="", avx512_bf16=True)
    big = make_inputs(c_in=512, c_out=8, dtype=torch.bfloat16, channels_last=channels_last)
    small = make_inputs(c_in=64, c_out=8, dtype=torch.bfloat16, channels_last=channels_last)
    want = fpn_kernels.upsample_add_conv1x1_reference(*big)
    got = None

    def call():
        nonlocal got
        got = fpn_kernels.upsample_add_conv1x1(*big)

    assert fused_kernel_calls(call) == 0
    assert torch.equal(got, want)  # eager: the spec itself
    assert fused_kernel_calls(lambda: fpn_kernels.upsample_add_conv1x1(*small)) == 1
    assert fused_kernel_calls(lambda: fpn_kernels.upsample_add_conv1x1(*big, backend="cpu")) == 1


def test_the_op_follows_the_float32_rule_end_to_end(isa):
    isa(gemm="avx512_bf16", avx512_bf16=True, f32_brgemm=True)
    wide_cl = make_inputs(c_in=1024, c_out=8, channels_last=True)
    wide_nchw = make_inputs(c_in=1024, c_out=8)
    assert fused_kernel_calls(lambda: fpn_kernels.upsample_add_conv1x1(*wide_cl)) == 0
    assert torch.equal(fpn_kernels.upsample_add_conv1x1(*wide_cl),
                       fpn_kernels.upsample_add_conv1x1_reference(*wide_cl))
    assert fused_kernel_calls(lambda: fpn_kernels.upsample_add_conv1x1(*wide_nchw)) == 1
    isa(gemm="amx_bf16", avx512_bf16=True, f32_brgemm=False)
    assert fused_kernel_calls(lambda: fpn_kernels.upsample_add_conv1x1(*wide_cl)) == 1
