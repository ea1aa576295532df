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
    """``isa(gemm=..., avx512_bf16=...)``: the CPU the rule sees; ``gemm`` is what the kernel's
    bf16 GEMMs run on ("amx_bf16", "avx512_bf16", or "" for fp32 copies)."""

    def set_isa(gemm: str, avx512_bf16: bool):
        monkeypatch.setattr(_cpu_backend, "_bf16_gemm_isa", lambda: gemm)
        monkeypatch.setattr(_cpu_backend, "_has_avx512_bf16", lambda: avx512_bf16)

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


def test_the_rule_is_bfloat16_only_and_needs_onednn(isa):
    isa(gemm="", avx512_bf16=True)
    for dtype in (torch.float32, torch.float64, torch.float16):
        for channels_last in (False, True):  # no float32 rule (fpn_kernels/_cpu_backend.py)
            assert auto(dtype=dtype, channels_last=channels_last, c_in=2048) == "cpu"
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
