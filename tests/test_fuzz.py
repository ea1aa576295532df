"""Differential fuzzing with hypothesis: every backend that runs CPU tensors against eager, forward
and backward, over random shapes (1-pixel, non-2x, top larger or smaller than lateral, rows wider
than one kernel tile), dtypes, layouts and strides (channels_last, sliced and transposed views),
bias or none, mode, scale factors (with ``floor(h * s) == H``); and NaN/Inf propagation.

``make test`` runs the quick profile (derandomized, so CI sees the same examples every run);
``pytest -m fuzz`` runs the long one. The Triton kernels join through a fresh process with
``TRITON_INTERPRET=1`` (it must be set before triton is imported), when triton is installed.

The oracle is eager: ``upsample_add_conv1x1_reference`` for the output, eager autograd for the
lateral, weight and bias gradients, and for ``top`` the exact adjoint of the gather eager's
``F.interpolate`` performed (the spec, see fpn_kernels/reference.py: ATen's own CPU upsample
backward is not that adjoint when its forward took the generic kernel).
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _differential import (
    assert_matches,
    eager,
    eager_gather,
    forward_backward,
    gradient_scales,
    op,
)
from conftest import fused_backends, make_inputs, run_pytest_under_interpreter
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import Tensor

from fpn_kernels import backends, ops

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
# Under the interpreter this file fuzzes Triton alone (the plain run covers the rest).
BACKENDS = ["triton"] if INTERPRETING else fused_backends("cpu")
DTYPES = [d for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
          if any(d in backends.BACKENDS[b].dtypes for b in BACKENDS)]

# Examples per test. The quick profile is what `make test` runs (about 200 in all, < 60 s here);
# the interpreter runs each Triton program instance in Python, so its profiles are smaller.
_COMMON = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fpn-quick", max_examples=120, derandomize=True, **_COMMON)
settings.register_profile("fpn-long", max_examples=2000, **_COMMON)
settings.register_profile("fpn-interpret-quick", max_examples=12, derandomize=True, **_COMMON)
settings.register_profile("fpn-interpret-long", max_examples=150, **_COMMON)
QUICK = settings.get_profile("fpn-interpret-quick" if INTERPRETING else "fpn-quick")
LONG = settings.get_profile("fpn-interpret-long" if INTERPRETING else "fpn-long")
# The largest N * max(C_in, C_out) * H * W a case may have (keeps one example ~10 ms here).
MAX_ELEMENTS = 6_000 if INTERPRETING else 60_000

MODES = ("nearest", "nearest-exact")
LAYOUTS = ("contiguous", "channels_last", "channels_last_sliced", "sliced", "transposed")
WEIGHT_LAYOUTS = ("4d", "2d", "2d_transposed", "4d_sliced")
BIAS_LAYOUTS = ("none", "contiguous", "strided")
LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- inputs


def laid_out(values: Tensor, layout: str, requires_grad: bool = False) -> Tensor:
    """``values`` (N, C, H, W) in ``layout``; a view of a leaf (that requires grad) for the
    strided layouts, so the op sees a non-contiguous tensor and gradients flow."""
    n, c, h, w = values.shape
    if layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        return values.contiguous(memory_format=fmt).requires_grad_(requires_grad)
    if layout == "sliced":  # every other channel and column of a larger buffer
        base = values.new_zeros(n, 2 * c, h, 2 * w + 1)
        base[:, ::2, :, 1::2] = values
        return base.requires_grad_(requires_grad)[:, ::2, :, 1::2]
    if layout == "channels_last_sliced":  # channels innermost, rows padded
        base = values.new_zeros(n, c, h, w + 2).contiguous(memory_format=torch.channels_last)
        base[..., 1:w + 1] = values
        return base.requires_grad_(requires_grad)[..., 1:w + 1]
    if layout == "transposed":  # W-major planes
        return values.transpose(2, 3).contiguous().requires_grad_(requires_grad).transpose(2, 3)
    raise AssertionError(layout)


def weight_laid_out(values: Tensor, layout: str, requires_grad: bool) -> Tensor:
    c_out, c_in = values.shape[:2]
    if layout == "4d":
        return values.contiguous().requires_grad_(requires_grad)
    if layout == "2d":
        return values.reshape(c_out, c_in).contiguous().requires_grad_(requires_grad)
    if layout == "2d_transposed":
        return values.reshape(c_out, c_in).t().contiguous().requires_grad_(requires_grad).t()
    if layout == "4d_sliced":
        base = values.new_zeros(c_out, 2 * c_in, 1, 1)
        base[:, ::2] = values
        return base.requires_grad_(requires_grad)[:, ::2]
    raise AssertionError(layout)


def bias_laid_out(values: Tensor | None, layout: str, requires_grad: bool) -> Tensor | None:
    if layout == "none":
        return None
    if layout == "contiguous":
        return values.requires_grad_(requires_grad)
    base = values.new_zeros(2 * values.shape[0])
    base[::2] = values
    return base.requires_grad_(requires_grad)[::2]


@dataclass(frozen=True)
class Case:
    n: int
    c_in: int
    c_out: int
    out_hw: tuple[int, int]
    top_hw: tuple[int, int]
    mode: str
    scale_factor: float | tuple[float, float] | None
    dtype: torch.dtype
    lateral_layout: str
    top_layout: str
    weight_layout: str
    bias_layout: str
    grad_layout: str
    needs: tuple[bool, bool, bool, bool]  # gradients wanted for lateral, weight, bias, top
    seed: int
    # (input name, position as a fraction of its numel, value): NaN/Inf written into the inputs.
    specials: tuple[tuple[str, float, float], ...] = ()

    @property
    def kwargs(self) -> dict:
        return dict(mode=self.mode, scale_factor=self.scale_factor)

    def inputs(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        """Fresh inputs (new leaves each call, same values) in the case's dtype and layouts."""
        values = dict(zip(
            ("lateral", "weight", "bias", "top"),
            make_inputs(self.n, self.c_in, self.c_out, self.out_hw, self.top_hw,
                        dtype=self.dtype, bias=self.bias_layout != "none", seed=self.seed),
            strict=True,
        ))
        for name, where, value in self.specials:
            flat = values[name].view(-1)
            flat[min(int(where * flat.numel()), flat.numel() - 1)] = value
        need = dict(zip(("lateral", "weight", "bias", "top"), self.needs, strict=True))
        return (
            laid_out(values["lateral"], self.lateral_layout, need["lateral"]),
            weight_laid_out(values["weight"], self.weight_layout, need["weight"]),
            bias_laid_out(values["bias"], self.bias_layout, need["bias"]),
            laid_out(values["top"], self.top_layout, need["top"]),
        )

    def grad_out(self) -> Tensor | None:
        if not any(self.needs):
            return None
        g = torch.Generator().manual_seed(self.seed + 1)
        values = torch.randn(self.n, self.c_out, *self.out_hw, generator=g).to(self.dtype)
        return laid_out(values, self.grad_layout)


SCALES = st.one_of(
    # Exact factors, odd ones, and ones just above 1 and 2 (floor(h * s) is h or 2h, where
    # ATen's vectorized CPU kernel takes its size short-cut and its generic kernel does not).
    st.sampled_from([0.5, 1.0, 1.5, 2.0, 2.05, 3.0, 4.0, 1.001, 2.001]),
    st.floats(0.25, 4.0, allow_nan=False, allow_infinity=False),
)


@st.composite
def axis_sizes(draw, scale: float | None, max_top: int, out_range: tuple[int, int]):
    """(top size, output size) of one axis: any pair (equal, 2x, larger or smaller), or, with a
    scale factor, the output size F.interpolate gives: floor(top * scale), in ``out_range``
    where the scale allows."""
    min_out, max_out = out_range
    if scale is None:
        top = draw(st.integers(1, max_top))
        out = draw(st.one_of(st.just(top), st.just(2 * top), st.integers(min_out, max_out)))
        return top, min(max(out, min_out), max_out)
    smallest = max(math.ceil(min_out / scale), 1)
    top = draw(st.integers(smallest, max(smallest, math.ceil(max_out / scale))))
    while math.floor(top * scale) < 1:  # 1 / scale rounded down
        top += 1
    return top, math.floor(top * scale)


@st.composite
def cases(draw, max_elements: int = MAX_ELEMENTS, grads: bool = True) -> Case:
    sizing = draw(st.sampled_from(("size", "scale", "scale_pair")))
    scales = (None, None)
    if sizing != "size":
        sh = draw(SCALES)
        scales = (sh, sh if sizing == "scale" else draw(SCALES))
    # Rows wider than the C++ kernel's 1024-pixel tile in some cases; else a few dozen pixels.
    wide = draw(st.integers(0, 3)) == 0 if max_elements >= 20_000 else False
    top_h, out_h = draw(axis_sizes(scales[0], 3 if wide else 24, (1, 4 if wide else 64)))
    top_w, out_w = draw(axis_sizes(scales[1], 400 if wide else 48,
                                   (1025, 1300) if wide else (1, 160)))
    n = draw(st.integers(1, 3))
    limit = max(1, min(72, max_elements // (n * out_h * out_w)))
    # Small counts, and counts around the C++ kernel's 32-row C_out blocks and SIMD widths.
    channel_counts = st.one_of(st.integers(1, limit), st.sampled_from(
        sorted({min(c, limit) for c in (3, 8, 16, 17, 31, 32, 33, 64, 65, 72)})))
    c_in, c_out = draw(channel_counts), draw(channel_counts)
    scale_factor = None if sizing == "size" else scales[0] if sizing == "scale" else scales
    bias_layout = draw(st.sampled_from(BIAS_LAYOUTS))
    needs = tuple(draw(st.booleans()) if grads else False for _ in range(4))
    return Case(
        n=n, c_in=c_in, c_out=c_out, out_hw=(out_h, out_w), top_hw=(top_h, top_w),
        mode=draw(st.sampled_from(MODES)), scale_factor=scale_factor,
        dtype=draw(st.sampled_from(DTYPES)),
        lateral_layout=draw(st.sampled_from(LAYOUTS)), top_layout=draw(st.sampled_from(LAYOUTS)),
        weight_layout=draw(st.sampled_from(WEIGHT_LAYOUTS)), bias_layout=bias_layout,
        grad_layout=draw(st.sampled_from(("contiguous", "channels_last", "transposed"))),
        needs=(needs[0], needs[1], needs[2] and bias_layout != "none", needs[3]),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------- oracle


def output_format(t: Tensor) -> torch.memory_format | None:
    if t.is_contiguous():
        return torch.contiguous_format
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else None


def check_against_eager(case: Case, backends_under_test: list[str]) -> None:
    expected = eager(*case.inputs(), **case.kwargs)
    grad_out = case.grad_out()
    model, expected_grads = forward_backward(eager_gather, case.inputs(), grad_out, **case.kwargs)
    if not case.specials:
        assert torch.equal(model, expected), "the oracle's gather model differs from eager"
    scales = gradient_scales(case.c_out, case.n, case.out_hw, case.top_hw)
    tested = 0
    for backend in backends_under_test:
        if case.dtype not in backends.BACKENDS[backend].dtypes:
            continue
        tested += 1
        lateral, weight, bias, top = inputs = case.inputs()
        out, grads = forward_backward(op(backend), inputs, grad_out, **case.kwargs)
        assert_matches(out, expected, msg=f"{backend} forward")
        # The output follows lateral's layout by the op's one rule, which is conv2d's.
        fmt = torch.channels_last if ops.is_channels_last(lateral) else torch.contiguous_format
        assert out.is_contiguous(memory_format=fmt), f"{backend}: output not in {fmt}"
        if output_format(expected) is not None:
            assert out.is_contiguous(memory_format=output_format(expected)), (
                f"{backend}: output strides {out.stride()}, eager's {expected.stride()}")
        assert grads.keys() == expected_grads.keys()
        for name, grad in grads.items():
            assert_matches(grad, expected_grads[name], scale=scales[name],
                           msg=f"{backend} grad_{name}")
    assert tested, f"no backend under test runs {case.dtype}"


def _generic_kernel_example(top_hw, out_hw, scale_factor, mode, dtype, layout, c_out) -> Case:
    return Case(n=1, c_in=2, c_out=c_out, out_hw=out_hw, top_hw=top_hw, mode=mode,
                scale_factor=scale_factor, dtype=dtype, lateral_layout=layout, top_layout=layout,
                weight_layout="4d", bias_layout="contiguous", grad_layout=layout,
                needs=(True, True, True, True), seed=0)


# Sizes where ATen's generic CPU upsample kernel (out_h + out_w > 128, top not channels_last
# with > 3 channels) picks other pixels than its vectorized one; random search rarely lands on
# them (< 1% of such sizes), so they always run.
GENERIC_KERNEL_EXAMPLES = [
    _generic_kernel_example((1, 75), (1, 215), None, "nearest", torch.float64, "channels_last", 3),
    _generic_kernel_example((1, 62), (1, 240), (1.0, 3.88), "nearest", torch.float64,
                            "contiguous", 4),
    _generic_kernel_example((1, 68), (1, 232), (1.0, 3.42), "nearest-exact", torch.float64,
                            "contiguous", 4),
    _generic_kernel_example((51, 2), (74, 141), None, "nearest-exact", torch.float32,
                            "channels_last", 3),
    _generic_kernel_example((1, 100), (1, 200), (1.0, 2.005), "nearest", torch.float32,
                            "contiguous", 4),
]


# Several 32-row C_out blocks, pixel tiles and chunks, with every kind of strided input; and rows
# wider than one 1024-pixel tile: always run, whatever the random search draws.
LARGE_EXAMPLES = [
    Case(n=2, c_in=33, c_out=72, out_hw=(40, 60), top_hw=(20, 30), mode="nearest",
         scale_factor=None, dtype=torch.float32, lateral_layout="sliced", top_layout="transposed",
         weight_layout="2d_transposed", bias_layout="strided", grad_layout="channels_last",
         needs=(True, True, True, True), seed=1),
    Case(n=2, c_in=5, c_out=40, out_hw=(2, 1100), top_hw=(1, 537), mode="nearest-exact",
         scale_factor=(2.0, 2.05), dtype=torch.bfloat16, lateral_layout="channels_last_sliced",
         top_layout="channels_last", weight_layout="4d_sliced", bias_layout="contiguous",
         grad_layout="transposed", needs=(True, True, True, True), seed=2),
]


def with_fixed_examples(test):
    # The interpreter would spend most of its budget on the large ones (made for the C++ tiles).
    fixed = GENERIC_KERNEL_EXAMPLES + ([] if INTERPRETING else LARGE_EXAMPLES)
    for case in reversed(fixed):
        if case.dtype in DTYPES:
            test = example(case=case)(test)
    return test


@QUICK
@given(case=cases())
@with_fixed_examples
def test_matches_eager(case):
    check_against_eager(case, BACKENDS)


@pytest.mark.fuzz
@LONG
@given(case=cases())
@with_fixed_examples
def test_matches_eager_long(case):
    check_against_eager(case, BACKENDS)


# --------------------------------------------------------------------------- NaN and Inf

SPECIAL_VALUES = (math.nan, math.inf, -math.inf)


@st.composite
def nonfinite_cases(draw) -> Case:
    """A forward-only case with NaN/Inf written into lateral, weight, bias and/or top."""
    case = draw(cases(max_elements=min(MAX_ELEMENTS, 20_000), grads=False))
    names = ["lateral", "weight", "top"] + (["bias"] if case.bias_layout != "none" else [])
    specials = draw(st.lists(
        st.tuples(st.sampled_from(names), st.floats(0, 1, exclude_max=True),
                  st.sampled_from(SPECIAL_VALUES)),
        min_size=1, max_size=4,
    ))
    return Case(**{**case.__dict__, "specials": tuple(specials)})


@settings(QUICK, max_examples=QUICK.max_examples // 2)
@given(case=nonfinite_cases())
def test_nan_and_inf_propagate_like_eager(case):
    """NaN and +-Inf land at eager's positions (assert_matches compares the masks)."""
    check_against_eager(case, BACKENDS)


@pytest.mark.fuzz
@settings(LONG, max_examples=LONG.max_examples // 4)
@given(case=nonfinite_cases())
def test_nan_and_inf_propagate_like_eager_long(case):
    check_against_eager(case, BACKENDS)


# One named example per input, each reaching the output along its own path.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("specials", [
    (("lateral", 0.3, math.nan),),                          # one pixel, every output channel
    (("lateral", 0.3, math.inf), ("lateral", 0.7, -math.inf)),
    (("weight", 0.5, math.inf),),                           # one output channel, +-Inf and NaN
    (("bias", 0.0, math.nan),),                             # one whole output channel
    (("bias", 0.5, -math.inf), ("top", 0.25, math.inf)),   # -Inf + Inf = NaN: channel 3
    (("top", 0.1, math.nan), ("top", 0.9, -math.inf)),     # the upsampled block of a pixel
], ids=lambda s: "+".join(f"{name}{value}" for name, _, value in s))
def test_named_nan_and_inf_examples(backend, dtype, layout, specials):
    if dtype not in backends.BACKENDS[backend].dtypes:
        pytest.skip(f"{backend} does not run {dtype}")
    case = Case(n=2, c_in=5, c_out=6, out_hw=(9, 13), top_hw=(4, 7), mode="nearest",
                scale_factor=None, dtype=dtype, lateral_layout=layout, top_layout=layout,
                weight_layout="4d", bias_layout="contiguous", grad_layout=layout,
                needs=(False,) * 4, seed=3, specials=specials)
    out = op(backend)(*case.inputs(), **case.kwargs)
    expected = eager(*case.inputs(), **case.kwargs)
    assert not torch.isfinite(expected).all(), "the example must reach the output"
    assert_matches(out, expected, msg=f"{backend} {specials}")


# --------------------------------------------------------------------------- Triton


def _triton_interpreter_run(marker: str) -> None:
    """This file's fuzz tests again, in a fresh process with TRITON_INTERPRET=1 (Triton only)."""
    test = "test_matches_eager_long" if marker == "fuzz" else "test_matches_eager"
    run = run_pytest_under_interpreter(f"{Path(__file__).resolve()}::{test}", "-m", marker,
                                       timeout=1800)
    assert "1 passed" in run.stdout, run.stdout[-2000:]


TRITON_PRESENT = (importlib.util.find_spec("triton") is not None
                  and (Path(__file__).resolve().parents[1] / "fpn_kernels/triton").is_dir())
needs_triton = pytest.mark.skipif(not TRITON_PRESENT or INTERPRETING,
                                  reason="triton or the triton backend is not installed")


@needs_triton
def test_triton_interpreter_matches_eager():
    _triton_interpreter_run("not fuzz")


@pytest.mark.fuzz
@needs_triton
def test_triton_interpreter_matches_eager_long():
    _triton_interpreter_run("fuzz")
