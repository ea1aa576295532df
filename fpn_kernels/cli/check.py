"""``python -m fpn_kernels check``: every available backend against eager.

The matrix: backend x device it runs on here x precision it supports (float32, float64,
bfloat16, float16, and on CUDA tf32: float32 tensors with TF32 allowed, as eager's conv2d does by
default there; plain float32 on CUDA runs with TF32 off) x layout (NCHW, channels_last) x shape
(odd and non-2x sizes, 1x1 and larger-than-lateral tops, channel counts not a multiple of 8,
the generic ATen index kernel, no bias, "nearest-exact", scale factors) x direction (the forward
output, then all four gradients of one backward). Every check runs the public op and compares
with eager autograd on identical inputs under per-precision tolerances. Prints one line per
failure and a summary; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import backends, upsample_add_conv1x1, upsample_add_conv1x1_reference
from ..precision import cudnn_conv_allows_tf32
from .cases import DTYPES, LAYOUTS, Level, make_grad_out, make_inputs, parse_names

# (atol, rtol) per precision on unit-scale data; atol grows with sqrt(number of summed terms)
# for the gradients (`gradient_scale`). fp32 GEMMs summed in different orders differ by ~1e-6;
# TF32 rounds the GEMM inputs to 10 mantissa bits; float16 / bfloat16 results differ by a few
# units in the last place of their 10/7-bit mantissas (eager rounds the conv and the upsampled
# map before the add, a fused kernel rounds once).
TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (1e-4, 1e-4),
    "tf32": (1e-2, 1e-2),
    "float16": (1e-2, 1e-2),
    "bfloat16": (6e-2, 2e-2),
}
PRECISIONS = {**DTYPES, "tf32": torch.float32}


def tf32_enabled(device: str) -> bool:
    """Whether fp32 convolutions on ``device`` may run as TF32 now (eager's and our backends'
    rule: cuDNN's flag, True by default)."""
    return device == "cuda" and cudnn_conv_allows_tf32()


def tolerance(dtype: torch.dtype, device: str) -> tuple[float, float]:
    """(atol, rtol) for results of ``dtype`` computed on ``device`` under the current flags."""
    if dtype == torch.float32 and tf32_enabled(device):
        return TOLERANCES["tf32"]
    return TOLERANCES[str(dtype).replace("torch.", "")]


@contextlib.contextmanager
def fp32_math(precision: str, device: str) -> Iterator[None]:
    """On CUDA, allow TF32 for the "tf32" precision and forbid it for "float32"."""
    if device != "cuda":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    allow = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@dataclass(frozen=True)
class CheckCase:
    name: str
    level: Level
    mode: str = "nearest"
    scale_factor: tuple[float, float] | None = None
    bias: bool = True


def _case(name, n, c_in, c_out, out_hw, top_hw, **kwargs) -> CheckCase:
    return CheckCase(name, Level(name, n, c_in, c_out, out_hw, top_hw), **kwargs)


CASES = [
    _case("2x", 2, 16, 8, (16, 24), (8, 12)),
    _case("10->19", 2, 16, 8, (19, 19), (10, 10)),
    _case("38->75", 1, 8, 16, (75, 38), (38, 19)),
    _case("7->7", 2, 8, 8, (7, 7), (7, 7)),
    _case("1->5", 2, 8, 8, (5, 5), (1, 1)),
    _case("top-larger", 2, 8, 8, (5, 4), (12, 9)),  # some top pixels are never read
    _case("odd-channels", 2, 5, 7, (10, 19), (5, 10)),  # C_in, C_out not multiples of 8
    _case("wide-odd-channels", 1, 33, 17, (9, 12), (4, 6), bias=False),
    _case("nearest-exact", 2, 16, 8, (19, 19), (10, 10), mode="nearest-exact"),
    # ATen's CPU index math depends on the shape (indexing.aten_index_kernel): out_h + out_w
    # > 128 with an NCHW top, or a top of <= 3 channels, takes the generic kernel's formulas.
    _case("generic-38->75", 1, 8, 16, (75, 76), (38, 38)),
    _case("generic-exact", 1, 8, 16, (67, 90), (30, 41), mode="nearest-exact"),
    _case("generic-3-channels", 2, 8, 3, (70, 61), (33, 29), mode="nearest-exact"),
    # ATen's CPU kernel short-cuts out == 2 * in even for this scale factor; the float formula
    # disagrees (DESIGN.md), so this case catches an index rule that ignores the device.
    _case("scale-2.05", 2, 8, 8, (20, 20), (10, 10), scale_factor=(2.05, 2.05)),
    _case("scale-pair-exact", 1, 8, 8, (15, 22), (10, 11), mode="nearest-exact",
          scale_factor=(1.5, 2.0)),
]
QUICK_CASES = ("10->19", "odd-channels", "nearest-exact", "generic-38->75", "scale-2.05")


@dataclass(frozen=True)
class Failure:
    backend: str
    device: str
    precision: str
    layout: str
    case: str
    what: str  # "forward", "grad_top", ...
    detail: str

    def __str__(self) -> str:
        return (f"FAIL {self.backend} on {self.device} {self.precision} {self.layout} "
                f"{self.case} {self.what}: {self.detail}")


def compare(actual: Tensor, expected: Tensor, tol: tuple[float, float],
            scale: float = 1.0) -> str | None:
    """None when ``actual`` matches ``expected`` within ``tol`` = (atol, rtol), atol scaled by
    ``scale``; else what is wrong."""
    if actual.dtype != expected.dtype:
        return f"dtype {actual.dtype}, expected {expected.dtype}"
    if actual.shape != expected.shape:
        return f"shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    if expected.numel() == 0:
        return None
    atol, rtol = tol
    got, want = actual.detach().double(), expected.detach().double()
    error = (got - want).abs()
    bad = ~(error <= atol * scale + rtol * want.abs())  # NaN errors count as bad
    if not bad.any():
        return None
    worst = tuple(int(i) for i in torch.unravel_index(torch.argmax(error.nan_to_num(math.inf)),
                                                      error.shape))
    return (f"{int(bad.sum())} of {error.numel()} elements off, max abs err "
            f"{float(error.nan_to_num(math.inf).max()):.3g} (tolerance {atol * scale:.3g} + "
            f"{rtol:g}*|expected|), worst at {worst}: got {float(got[worst]):.6g}, "
            f"expected {float(want[worst]):.6g}")


def gradient_scale(level: Level, name: str) -> float:
    """The atol factor for gradient ``name`` ("lateral", "weight", "bias", "top"): the square
    root of how many products each of its elements sums (rounding errors add up like that)."""
    terms = {"lateral": level.c_out, "weight": level.n * level.pixels,
             "bias": level.n * level.pixels,
             "top": max(1, math.ceil(level.pixels / level.top_pixels))}
    return math.sqrt(terms[name])


def check_one(backend: str, device: str, precision: str, layout: str,
              case: CheckCase, seed: int = 0) -> list[Failure]:
    """Forward and backward of one combination; the failures found (empty when it passes)."""
    with fp32_math(precision, device):
        return _check_one(backend, device, precision, layout, case, seed)


def _check_one(backend: str, device: str, precision: str, layout: str,
               case: CheckCase, seed: int) -> list[Failure]:
    def fail(what: str, detail: str) -> Failure:
        return Failure(backend, device, precision, layout, case.name, what, detail)

    dtype, tol = PRECISIONS[precision], TOLERANCES[precision]

    channels_last = layout == "channels_last"
    kwargs: dict[str, Any] = {"mode": case.mode, "scale_factor": case.scale_factor}

    # A tuple, so that mypy checks each of the op's positional arguments against its own type.
    def leaves() -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
        lateral, weight, bias, top = make_inputs(case.level, dtype, channels_last, device,
                                                 requires_grad=True, seed=seed)
        return (lateral, weight, bias if case.bias else None, top)

    ours, theirs = leaves(), leaves()
    try:
        out = upsample_add_conv1x1(*ours, backend=backend, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a backend that raises fails the check
        return [fail("forward", f"raised {type(exc).__name__}: {exc}")]
    expected = upsample_add_conv1x1_reference(*theirs, **kwargs)
    failures = []
    problem = compare(out, expected, tol)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if problem is None and not out.is_contiguous(memory_format=fmt):
        problem = f"output is not {layout} (the output follows lateral's layout)"
    if problem:
        failures.append(fail("forward", problem))

    names = [n for n, t in zip(("lateral", "weight", "bias", "top"), ours, strict=True)
             if t is not None]
    grad_out = make_grad_out(case.level, dtype, channels_last, device, seed=seed + 1)
    try:
        grads = torch.autograd.grad(out, [t for t in ours if t is not None], grad_out)
    except Exception as exc:  # noqa: BLE001
        return failures + [fail("backward", f"raised {type(exc).__name__}: {exc}")]
    expected_grads = torch.autograd.grad(expected, [t for t in theirs if t is not None], grad_out)
    for name, got, want in zip(names, grads, expected_grads, strict=True):
        problem = compare(got, want, tol, scale=gradient_scale(case.level, name))
        if problem:
            failures.append(fail(f"grad_{name}", problem))
    return failures


@dataclass
class CheckReport:
    checked: int  # combinations run (each: the forward and every gradient)
    failures: list[Failure]


def targets(only: Sequence[str] | None, device: str | None) -> tuple[list[tuple[str, str]],
                                                                        list[str]]:
    """(backend, device) pairs to check, and one line per requested backend left out."""
    devices = [device] if device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    pairs, left_out = [], []
    for name, backend in backends.BACKENDS.items():
        if only is not None and name not in only:
            continue
        if backend.unavailable_reason is not None:
            left_out.append(f"{name} (unavailable: {backend.unavailable_reason})")
            continue
        runs_on = [d for d in devices if d in backend.supported_devices(auto=False)]
        if not runs_on:
            left_out.append(f"{name} (runs on {', '.join(backend.devices)}; checking "
                            f"{', '.join(devices)})")
        pairs += [(name, d) for d in runs_on]
    return pairs, left_out


def run_checks(pairs: Sequence[tuple[str, str]], precisions: Sequence[str],
               layouts: Sequence[str], cases: Sequence[CheckCase],
               verbose: bool = False) -> CheckReport:
    checked, failures = 0, []
    for backend, device in pairs:
        supported = backends.BACKENDS[backend].dtypes
        for precision in precisions:
            if PRECISIONS[precision] not in supported or (precision == "tf32" and device != "cuda"):
                continue
            for layout in layouts:
                for seed, case in enumerate(cases):
                    found = check_one(backend, device, precision, layout, case, seed=seed)
                    checked += 1
                    failures += found
                    for failure in found:
                        print(failure, flush=True)
                    if verbose and not found:
                        print(f"ok   {backend} on {device} {precision} {layout} {case.name}")
    return CheckReport(checked, failures)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fpn_kernels check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help=f"only the cases {', '.join(QUICK_CASES)}")
    p.add_argument("--backends", help="comma list of backends (default: every available one)")
    p.add_argument("--dtype", default=",".join(PRECISIONS),
                   help=f"comma list of {', '.join(PRECISIONS)} (default: all; each backend "
                        "gets the ones it supports; tf32 applies to CUDA only)")
    p.add_argument("--layout", default=",".join(LAYOUTS), help="nchw, channels_last or both")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cpu, and cuda when available")
    p.add_argument("-v", "--verbose", action="store_true", help="print passing checks too")
    return p


def _names(text: str, allowed: Sequence[str], flag: str) -> list[str]:
    try:
        return parse_names(text, allowed)
    except ValueError as e:
        raise SystemExit(f"check: {flag}: {e}") from None


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    only = None if args.backends is None else _names(args.backends, list(backends.BACKENDS),
                                                        "--backends")
    precisions = _names(args.dtype, list(PRECISIONS), "--dtype")
    layouts = _names(args.layout, LAYOUTS, "--layout")
    cases = [c for c in CASES if c.name in QUICK_CASES] if args.quick else CASES
    pairs, left_out = targets(only, args.device)
    if not pairs:
        print(f"check: nothing to check: {'; '.join(left_out)}")
        return 1
    start = time.perf_counter()
    result = run_checks(pairs, precisions, layouts, cases, verbose=args.verbose)
    where = ", ".join(f"{b} on {d}" for b, d in pairs)
    print(f"check: {result.checked} combinations of ({where}) x precisions x {len(layouts)} "
          f"layouts x {len(cases)} shapes, forward and backward each: "
          f"{len(result.failures)} failures ({time.perf_counter() - start:.1f} s)")
    if left_out:
        print(f"not checked: {'; '.join(left_out)}")
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
