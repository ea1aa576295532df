"""``python -m fpn_kernels bench``: eager vs torch.compile vs every available backend on the FPN
top-down levels, with the machine's own limits as the yardstick.

For every (dtype, layout, direction) and level it times eager (conv2d + interpolate + add),
torch.compile of that same function and each fpn_kernels backend (through the public op), then
reports per row the median and p20-p80 spread, the speedups over eager and over torch.compile,
GB/s (bytes model) and GFLOP/s, the share of the measured GEMM peak and of the roofline, and
the max abs error vs eager; a "total" row per implementation sums the levels. With an r50
preset it adds the whole ResNet-50-FPN neck end to end (torchvision vs FusedFPN). The defaults
(800x1216, N=2, fp32, NCHW, forward) take about a minute and a half on a 2-core CPU.
``--json FILE`` keeps every figure; ``python -m fpn_kernels.cli.report FILE`` renders it as
markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path

import torch

from .. import backends
from . import cases, report
from .cases import COMPILE, DIRECTIONS, EAGER, LAYOUTS, Level
from .machine import Peaks, machine_info, measure_peaks
from .roofline import bytes_moved, gemm_flops, roofline_ms
from .timing import Timing, TimingPolicy, time_all

NECK_BASELINE, NECK_COMPILE = "torchvision", "torchvision+compile"


def _csv(choices: Iterable[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        try:
            return cases.parse_names(text, list(choices))
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    presets = "; ".join(f"{name}: {p.description}" for name, p in cases.PRESETS.items())
    p = argparse.ArgumentParser(prog="python -m fpn_kernels bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(cases.PRESETS), default=None,
                   help=f"level shapes ({presets}). Default {cases.DEFAULT_PRESET}, "
                        "or none when --shape is given")
    p.add_argument("--shape", action="append", type=cases.parse_shape, default=[],
                   metavar="N,C_in,C_out,H,W,h,w", help="a custom level (repeatable)")
    p.add_argument("--mode", type=_csv(DIRECTIONS), default=["fwd"],
                   help="fwd, fwd+bwd or both (comma list); default fwd")
    p.add_argument("--dtype", type=_csv(cases.DTYPES), default=["float32"],
                   help=f"comma list of {', '.join(cases.DTYPES)}; default float32")
    p.add_argument("--layout", type=_csv(LAYOUTS), default=["nchw"],
                   help="nchw, channels_last or both; default nchw")
    p.add_argument("--backends", type=_csv(backends.BACKENDS), default=None,
                   help="fpn_kernels backends to time (default: every available one); "
                        "eager is always timed as the baseline")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    p.add_argument("--no-neck", action="store_true",
                   help="skip the end-to-end rows: the whole ResNet-50-FPN neck (torchvision vs "
                        "FusedFPN, eager and compiled) at the preset's image size, forward; run "
                        "by default with an r50 preset")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--min-repeats", type=int, default=5)
    p.add_argument("--budget", type=float, default=2.0, metavar="SECONDS",
                   help="CPU timing time per case beyond --min-repeats rounds (default 2)")
    p.add_argument("--gemm-floor", action="store_true",
                   help=f"also time {cases.CONV_ONLY}: eager's 1x1 conv alone, no upsample or add "
                        "(what a fused kernel with eager's own GEMM cannot go below; no error "
                        "column, it computes something else)")
    p.add_argument("--json", metavar="FILE", help="write every figure and the machine to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="bar plot of the speedups over eager")
    return p


# --------------------------------------------------------------------------- progress


class Progress:
    """A rich progress bar on a terminal, one plain line per step otherwise."""

    def __init__(self, total: int, live: bool):
        self.total, self.done, self._bar = total, 0, None
        if live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), transient=True)
            self._task = self._bar.add_task("bench", total=total)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, what: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=what)
        else:
            print(f"[{self.done + 1}/{self.total}] {what}", flush=True)

    def advance(self) -> None:
        self.done += 1
        if self._bar is not None:
            self._bar.advance(self._task)


# --------------------------------------------------------------------------- measuring


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in an output (a tensor, or a tuple / list / dict of them), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [t for item in value for t in _tensors(item)]


def _errors(outputs: dict[str, list[torch.Tensor]], baseline: str) -> dict[str, float]:
    """Max abs error of every output against the baseline's (none for the conv-only floor,
    which computes something else)."""
    expected = outputs[baseline]
    return {name: max((cases.max_abs_error(a, e) for a, e in zip(got, expected, strict=True)),
                      default=0.0)
            for name, got in outputs.items() if name != cases.CONV_ONLY}


def _first_calls(steps: dict[str, Callable[[], object]], device: str,
                 grads_of: list[torch.Tensor], skipped: list[str], what: str
                 ) -> tuple[dict[str, list[torch.Tensor]], dict[str, float]]:
    """Call each step once (compiles torch.compile, not timed); return the outputs (then the
    gradients, for fwd+bwd) per step, and the first call's seconds. A step that raises is
    dropped with its reason in ``skipped``."""
    outputs, first_s = {}, {}
    for name in list(steps):
        start = time.perf_counter()
        try:
            out = steps[name]()
            _synchronize(device)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other impls
            skipped.append(f"{what} {name}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            del steps[name]
            continue
        first_s[name] = time.perf_counter() - start
        grads = [t.grad for t in grads_of if t.grad is not None]
        outputs[name] = [t.detach() for t in _tensors(out)] + grads
    return outputs, first_s


def measure_level(level: Level, dtype: torch.dtype, layout: str, direction: str,
                  impl_names: list[str], device: str, policy: TimingPolicy,
                  skipped: list[str]) -> tuple[dict[str, Timing], dict[str, float], dict]:
    """Time every impl on one level: (timings, max abs error vs eager, first-call seconds)."""
    channels_last = layout == "channels_last"
    backward = direction == "fwd+bwd"
    inputs = cases.make_inputs(level, dtype, channels_last, device, requires_grad=backward)
    grad_out = cases.make_grad_out(level, dtype, channels_last, device) if backward else None
    steps: dict[str, Callable[[], object]] = {
        name: cases.step(cases.make_impl(name, device), inputs, direction, grad_out)
        for name in impl_names}
    what = f"{level.name} {cases_label(dtype, layout, direction)}"
    outputs, first_s = _first_calls(steps, device, list(inputs), skipped, what)
    if EAGER not in outputs:
        raise RuntimeError(f"{what}: the eager baseline failed: {skipped[-1]}")
    errors = _errors(outputs, EAGER)
    del outputs
    timings = time_all(steps, policy, device)
    return timings, errors, first_s


def cases_label(dtype: torch.dtype, layout: str, direction: str) -> str:
    return f"{str(dtype).replace('torch.', '')} {layout} {direction}"


def _ratio(numerator: float | None, denominator: float) -> float | None:
    return None if numerator is None or denominator <= 0 else numerator / denominator


def make_rows(level_name: str, shape: dict | None, key: dict, timings: dict[str, dict],
              errors: dict[str, float], work: dict[str, tuple[int, int | None]],
              baseline: str, compiled: str, first_s: dict[str, float], *, peaks: Peaks,
              auto_backend: str | None = None) -> list[dict]:
    """One row per impl. ``timings[impl]``: ``Timing.as_dict()`` (or a sum's median_ms with
    no percentiles); ``work[impl]`` = (GEMM FLOPs, model bytes or None), absent when unknown;
    ``auto_backend``: the backend ``backend="auto"`` picks for this level here."""
    base_ms = timings[baseline]["median_ms"]
    compile_ms = timings[compiled]["median_ms"] if compiled in timings else None
    peak_gflops = peaks.gemm_gflops[key["dtype"]]
    rows = []
    for impl, timing in timings.items():
        median_ms = timing["median_ms"]
        row = {"section": "neck" if baseline == NECK_BASELINE else "level", "level": level_name,
               "shape": shape, **key, "impl": impl, "baseline": baseline,
               "backend": cases.backend_of(impl) if baseline == EAGER else None,
               "auto_backend": auto_backend,
               **timing,
               "speedup_vs_eager": _ratio(base_ms, median_ms),
               "speedup_vs_compile": _ratio(compile_ms, median_ms),
               "max_abs_err": errors.get(impl), "first_call_s": first_s.get(impl),
               "flops": None, "bytes": None, "bytes_model": None, "gflops": None, "gbps": None,
               "pct_gemm_peak": None, "roofline_ms": None, "pct_roofline": None}
        if work.get(impl) is not None:
            flops, nbytes = work[impl]
            seconds = median_ms / 1e3
            row.update(flops=flops, gflops=flops / seconds / 1e9,
                       pct_gemm_peak=100 * flops / seconds / 1e9 / peak_gflops)
            if nbytes is not None:
                roof = roofline_ms(flops, nbytes, peak_gflops, peaks.stream_gbps)
                row.update(bytes=nbytes, bytes_model="fused" if cases.is_fused(impl) else "eager",
                           gbps=nbytes / seconds / 1e9, roofline_ms=roof,
                           pct_roofline=100 * roof / median_ms)
        rows.append(row)
    return rows


def total_rows(rows: list[dict], levels: list[str], peaks: Peaks) -> list[dict]:
    """Per impl present at every level: the sums over the levels, as one row."""
    impls = [impl for impl in dict.fromkeys(r["impl"] for r in rows)
             if {r["level"] for r in rows if r["impl"] == impl} >= set(levels)]
    timings, errors, work = {}, {}, {}
    for impl in impls:
        mine = [r for r in rows if r["impl"] == impl]
        # A sum of medians has no percentiles of its own; it is noisy if a part is.
        timings[impl] = {"median_ms": sum(r["median_ms"] for r in mine), "p20_ms": None,
                         "p80_ms": None, "repeats": None, "spread": None,
                         "noisy": any(r["noisy"] for r in mine)}
        errs = [r["max_abs_err"] for r in mine]
        if None not in errs:
            errors[impl] = max(errs)
        nbytes = [r["bytes"] for r in mine]
        work[impl] = (sum(r["flops"] for r in mine), None if None in nbytes else sum(nbytes))
    key = {k: rows[0][k] for k in ("dtype", "layout", "direction")}
    return make_rows(report.TOTAL, None, key, timings, errors, work, EAGER, COMPILE, {},
                     peaks=peaks)


def measure_neck(batch: int, image_hw: tuple[int, int], dtype: torch.dtype, layout: str,
                 device: str, policy: TimingPolicy, use_compile: bool,
                 skipped: list[str]) -> tuple[dict, dict, dict] | None:
    """The whole ResNet-50-FPN neck end to end (fpn_kernels.cli.neck_bench), when present."""
    try:
        from . import neck_bench
    except ImportError as exc:
        skipped.append(f"end-to-end neck: fpn_kernels.cli.neck_bench is not available ({exc})")
        return None
    torch._dynamo.reset()  # a fresh compile cache per configuration, as for the levels
    steps: dict[str, Callable[[], object]] = dict(neck_bench.neck_cases(
        batch, dtype, layout == "channels_last", device, image_hw=image_hw))
    if not use_compile:
        steps = {name: fn for name, fn in steps.items() if "compile" not in name}
    what = f"neck {cases_label(dtype, layout, 'fwd')}"
    with torch.no_grad():
        outputs, first_s = _first_calls(steps, device, [], skipped, what)
        if NECK_BASELINE not in outputs:
            skipped.append(f"{what}: no {NECK_BASELINE} baseline, neck rows dropped")
            return None
        errors = _errors(outputs, NECK_BASELINE)
        del outputs
        timings = time_all(steps, policy, device)
    return timings, errors, first_s


# --------------------------------------------------------------------------- the run


def run(args: argparse.Namespace, live_progress: bool | None = None) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda, but torch.cuda.is_available() is False")
    preset = args.preset or (None if args.shape else cases.DEFAULT_PRESET)
    levels = (cases.preset_levels(preset) if preset else []) + list(args.shape)
    dtypes = {name: cases.DTYPES[name] for name in args.dtype}
    policy = TimingPolicy(min_repeats=args.min_repeats, budget_s=args.budget)
    skipped: list[str] = []
    warnings = []
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.5 * cores:
        warnings.append(f"the machine was busy when the run started (1-minute load average "
                        f"{load:.1f} on {cores} cores): expect noisy, slower timings")
        print(f"warning: {warnings[-1]}", file=sys.stderr)

    configs = [(dtype_name, layout, direction) for direction in args.mode
               for dtype_name in dtypes for layout in args.layout]
    image_hw = cases.PRESETS[preset].image_hw if preset else None
    neck = not args.no_neck and image_hw is not None
    if neck and "fwd" not in args.mode:
        skipped.append("end-to-end neck: forward only (add --mode fwd)")
    neck_steps = sum(1 for _, _, direction in configs if direction == "fwd") if neck else 0
    steps_total = len(configs) * len(levels) + neck_steps + 2
    if live_progress is None:
        from rich.console import Console
        live_progress = Console().is_terminal

    # Rows need the peaks, measured at the start and again at the end (a burst of load on a
    # shared machine only lowers a peak, so the better of the two counts): each configuration
    # keeps builders for its level rows and its neck rows until then.
    groups: list[tuple[list[partial[list[dict]]], partial[list[dict]] | None]] = []
    with Progress(steps_total, live_progress) as progress:
        progress.start("measuring the machine's GEMM and copy peaks")
        first_peaks = measure_peaks(device, list(dtypes.values()))
        progress.advance()
        for dtype_name, layout, direction in configs:
            dtype = dtypes[dtype_name]
            key = {"dtype": dtype_name, "layout": layout, "direction": direction}
            impl_names = [EAGER] + ([] if args.no_compile else [COMPILE])
            impl_names += cases.backend_impls(device, dtype, args.backends)
            impl_names += [cases.CONV_ONLY] if args.gemm_floor else []
            for name in args.backends or []:
                if (cases.OP_EAGER if name == "eager" else name) not in impl_names:
                    reasons = backends.BACKENDS[name].not_supported_reasons(
                        torch.device(device), dtype, auto=True)
                    skipped.append(f"backend {name}: not timed with {dtype_name} on {device} "
                                   f"({'; '.join(reasons)})")
            level_builders, neck_builder = [], None
            for level in levels:
                progress.start(f"{level.name} {cases_label(dtype, layout, direction)}: "
                               f"{', '.join(impl_names)}")
                timings, errors, first_s = measure_level(
                    level, dtype, layout, direction, impl_names, device, policy, skipped)
                element_size = torch.empty((), dtype=dtype).element_size()
                work = {impl: (gemm_flops(level, direction),
                               None if impl == cases.CONV_ONLY else
                               bytes_moved(level, element_size, cases.is_fused(impl), direction))
                        for impl in timings}
                # What backend="auto" runs this level with here (its rule reads dtype, layout,
                # C_in and the ISA), so a report can show what a user of "auto" gets.
                auto = backends.select_backend("auto", torch.device(device), dtype,
                                               layout == "channels_last", level.c_in)
                level_builders.append(partial(
                    make_rows, level.name, level.as_dict(), key,
                    {impl: t.as_dict() for impl, t in timings.items()}, errors, work, EAGER,
                    COMPILE, first_s, auto_backend=auto))
                progress.advance()
            if neck and direction == "fwd":
                assert image_hw is not None  # neck is set only with an image size
                progress.start(f"end-to-end neck {cases_label(dtype, layout, direction)}")
                measured = measure_neck(levels[0].n, image_hw, dtype, layout, device, policy,
                                        not args.no_compile, skipped)
                if measured is not None:
                    timings, errors, first_s = measured
                    neck_builder = partial(
                        make_rows, "neck", None, key,
                        {impl: t.as_dict() for impl, t in timings.items()}, errors, {},
                        NECK_BASELINE, NECK_COMPILE, first_s)
                progress.advance()
            groups.append((level_builders, neck_builder))
        progress.start("measuring the peaks again")
        peaks = Peaks.best(first_peaks, measure_peaks(device, list(dtypes.values())))
        progress.advance()

    rows: list[dict] = []
    for level_builders, neck_builder in groups:
        level_rows = [row for build in level_builders for row in build(peaks=peaks)]
        rows += level_rows
        if len(levels) > 1:
            rows += total_rows(level_rows, [lv.name for lv in levels], peaks)
        if neck_builder is not None:
            rows += neck_builder(peaks=peaks)
    return {
        "machine": {**machine_info(device), "load_average_1m_at_start": load},
        "peaks": peaks.as_dict(),
        "config": {
            "preset": preset, "levels": [{"name": lv.name, **lv.as_dict()} for lv in levels],
            "image_hw": image_hw, "neck": neck,
            "dtypes": list(dtypes), "layouts": args.layout, "directions": args.mode,
            "backends": args.backends, "compile": not args.no_compile,
            "gemm_floor": args.gemm_floor,
            "compile_options": cases.compile_options(device),
            "timing": {"min_repeats": policy.min_repeats, "max_repeats": policy.max_repeats,
                       "budget_s": policy.budget_s, "warmup": policy.warmup,
                       "clock": "triton do_bench" if device == "cuda" else "perf_counter"},
        },
        "baseline": EAGER,
        "rows": rows,
        "skipped": skipped,
        "warnings": warnings,
    }


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    result = run(args)
    report.print_rich(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    if args.plot:
        report.plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
