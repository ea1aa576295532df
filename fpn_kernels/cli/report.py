"""Render `bench` results: a rich table on the terminal, markdown for the README, a bar plot.

``python -m fpn_kernels.cli.report results.json > results.md`` renders a saved ``--json`` file.
Every renderer reads the same JSON-ready dict (``bench.run`` builds it), and every table uses
the one column list below.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from itertools import groupby
from pathlib import Path
from typing import cast

NOISE_MARK = "~"
TOTAL = "total"
CONV_ONLY = "conv-only"  # cases.CONV_ONLY (this module imports no torch)


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _median(row: dict) -> str:
    return _ms(row["median_ms"]) + (NOISE_MARK if row.get("noisy") else "")


def _spread(row: dict) -> str:
    if row.get("p20_ms") is None:
        return "–"
    return f"{_ms(row['p20_ms'])}–{_ms(row['p80_ms'])}"


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}x"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f}%"


def _error(value: float | None) -> str:
    return "–" if value is None else f"{value:.1e}"


# (header, cell, right-aligned)
COLUMNS: list[tuple[str, Callable[[dict], str], bool]] = [
    ("level", lambda r: r["level"], False),
    ("impl", lambda r: r["impl"], False),
    ("median ms", _median, True),
    ("p20–p80 ms", _spread, True),
    ("vs eager", lambda r: _times(r.get("speedup_vs_eager")), True),
    ("vs compile", lambda r: _times(r.get("speedup_vs_compile")), True),
    ("GB/s", lambda r: _number(r.get("gbps")), True),
    ("GFLOP/s", lambda r: _number(r.get("gflops")), True),
    ("% peak", lambda r: _percent(r.get("pct_gemm_peak")), True),
    ("% roof", lambda r: _percent(r.get("pct_roofline")), True),
    ("max abs err", lambda r: _error(r.get("max_abs_err")), True),
]

FOOTNOTES = [
    f"{NOISE_MARK} noisy: the p20–p80 spread is over 10% of the median.",
    "vs eager / vs compile: median time of eager (or torch.compile) / this row's; total rows "
    "compare the sums over the levels.",
    "GB/s from a bytes model (DESIGN.md: fused bytes for fused backends, eager bytes for "
    "eager, compile and op-eager); GFLOP/s counts the 1x1 conv GEMMs only.",
    "% peak: GFLOP/s over the measured GEMM peak (above 100% when the peak's torch.mm ran "
    "slower than this row's GEMM). % roof: the roofline time, max(GEMM FLOPs / GEMM peak, "
    "model bytes / copy GB/s), over the median.",
    "max abs err: vs eager on the same inputs (output; for fwd+bwd, output and all gradients).",
]


def footnotes(result: dict) -> list[str]:
    notes = list(FOOTNOTES)
    if any(row["impl"] == CONV_ONLY for row in result["rows"]):
        notes.append(f"{CONV_ONLY} (--gemm-floor): eager's 1x1 conv alone, without the upsample "
                     "and the add: not the op (no error), the floor of any fused kernel whose "
                     "GEMMs are only as fast as eager's; its vs eager is that kernel's bound.")
    if any(row["section"] == "neck" for row in result["rows"]):
        notes.append("neck: the whole ResNet-50-FPN neck end to end (fpn_kernels.cli.neck_bench);"
                     " there vs eager = vs torchvision's FPN, vs compile = vs its torch.compile.")
    return notes + [f"warning: {w}" for w in result.get("warnings", [])]


def group_key(row: dict) -> tuple[str, str, str]:
    return row["dtype"], row["layout"], row["direction"]


def group_title(key: tuple[str, str, str]) -> str:
    dtype, layout, direction = key
    return f"{dtype}, {layout}, {direction}"


def grouped(rows: Iterable[dict]) -> list[tuple[tuple[str, str, str], list[dict]]]:
    """Rows by (dtype, layout, direction), in the order they were measured."""
    return [(key, list(group)) for key, group in groupby(rows, key=group_key)]


def machine_line(result: dict) -> str:
    m, peaks = result["machine"], result["peaks"]
    where = m.get("gpu") or f"{m['cpu_model']}, {m['cpu_cores']} cores"
    gemm = ", ".join(f"{dtype} {value:.0f}" for dtype, value in peaks["gemm_gflops"].items())
    versions = f"torch {m['torch']}" + (f", triton {m['triton']}" if m.get("triton") else "")
    return (f"{where} ({m['torch_threads']} threads), {versions}. Measured peaks: GEMM "
            f"{gemm} GFLOP/s; stream {peaks['stream_gbps']:.1f} GB/s.")


def print_rich(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a pipe or a file: no 80-column wrap of the table
            console = Console(width=160)
    console.print(machine_line(result))
    console.print(levels_line(result))
    for key, rows in grouped(result["rows"]):
        table = Table(title=group_title(key), title_justify="left")
        for header, _, right in COLUMNS:
            table.add_column(header, justify="right" if right else "left", no_wrap=True)
        for index, row in enumerate(rows):
            new_level = index + 1 < len(rows) and rows[index + 1]["level"] != row["level"]
            table.add_row(*(cell(row) for _, cell, _ in COLUMNS), end_section=new_level)
        console.print(table)
    for note in footnotes(result):
        console.print(note, style="dim")
    for reason in result.get("skipped", []):
        console.print(f"skipped: {reason}")


def levels_line(result: dict) -> str:
    levels = "; ".join(
        f"{lv['name']} N={lv['n']} {lv['c_in']}x{lv['out_hw'][0]}x{lv['out_hw'][1]} <- "
        f"{lv['c_out']}x{lv['top_hw'][0]}x{lv['top_hw'][1]}" for lv in result["config"]["levels"])
    preset = result["config"]["preset"]
    return f"Levels ({preset or 'custom'}; lateral C_in x H x W <- top C_out x h x w): {levels}."


def markdown(result: dict) -> str:
    lines = [machine_line(result), "", levels_line(result), ""]
    for key, rows in grouped(result["rows"]):
        lines += [f"**{group_title(key)}**", ""]
        lines.append("| " + " | ".join(header for header, _, _ in COLUMNS) + " |")
        lines.append("|" + "|".join("---:" if right else "---" for _, _, right in COLUMNS) + "|")
        for row in rows:
            lines.append("| " + " | ".join(cell(row) for _, cell, _ in COLUMNS) + " |")
        lines.append("")
    lines += [f"- {note}" for note in footnotes(result)]
    lines += [f"- skipped: {reason}" for reason in result.get("skipped", [])]
    return "\n".join(lines) + "\n"


def _versus(time_ms: float, eager_ms: float, compile_ms: float | None) -> str:
    text = _times(eager_ms / time_ms)
    return text + (f" / {_times(compile_ms / time_ms)}" if compile_ms else "")


def _at_peak_ms(result: dict, dtype: str, level_rows: list[dict]) -> float | None:
    """The time the levels' GEMM FLOPs take at the run's measured GEMM peak of ``dtype``."""
    peak = result.get("peaks", {}).get("gemm_gflops", {}).get(dtype)
    flops = [r.get("flops") for r in level_rows]
    if not peak or None in flops:
        return None
    # `None in flops` ruled None out, which mypy does not narrow.
    return sum(cast("list[float]", flops)) / (peak * 1e9) * 1e3


def summary(result: dict, impl: str = "cpu") -> str:
    """One markdown table: a row per (dtype, layout, direction), per level ``impl``'s speedup
    over eager / over torch.compile (medians of one run) and its share of the GEMM peak, then
    the total; and what ``backend="auto"`` gets: the backend it picked for each level (as
    recorded by the run) and the sum of those backends' times against eager and compile."""
    levels = [lv["name"] for lv in result["config"]["levels"]]
    header = ["case", *levels, TOTAL, "auto picks", "auto total"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for key, rows in grouped(r for r in result["rows"] if r["section"] == "level"):
        by = {(r["level"], r["impl"]): r for r in rows}
        # The run names each row's fpn_kernels backend ("backend"), so auto's pick maps to a row.
        by_backend = {(r["level"], r["backend"]): r for r in rows if r["backend"]}
        if not all((level, impl) in by for level in levels):
            continue
        cells = [group_title(key)]
        for level in levels + [TOTAL]:
            mine = by[(level, impl)]
            eager = by[(level, "eager")]["median_ms"]
            compiled = by.get((level, "compile"), {}).get("median_ms")
            cell = _versus(mine["median_ms"], eager, compiled)
            if mine.get("pct_gemm_peak") is not None and level != TOTAL:
                cell += f" ({mine['pct_gemm_peak']:.0f}%)"
            floor = by.get((level, CONV_ONLY))
            if floor is not None:  # bench --gemm-floor: eager's GEMMs alone
                cell += f"; bound {_times(eager / floor['median_ms'])}"
            at_peak = _at_peak_ms(result, key[0], [by[(lv, impl)] for lv in levels])
            if level == TOTAL and at_peak:
                cell += f"; at peak {_times(min(eager, compiled or eager) / at_peak)}"
            cells.append(cell)
        picks = [by[(level, impl)].get("auto_backend") for level in levels]
        if None in picks or any((lv, b) not in by_backend
                                for lv, b in zip(levels, picks, strict=True)):
            cells += ["–", "–"]
        else:
            auto_ms = sum(by_backend[(lv, b)]["median_ms"]
                          for lv, b in zip(levels, picks, strict=True))
            compiled = by.get((TOTAL, "compile"), {}).get("median_ms")
            # Backend names: `None in picks` ruled None out, which mypy does not narrow.
            cells += [", ".join(cast("list[str]", picks)),
                      _versus(auto_ms, by[(TOTAL, "eager")]["median_ms"], compiled)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- per level: {impl} vs eager / vs torch.compile, median times of one run, "
             f"(% of the measured GEMM peak of the dtype); total: the sums over the levels.",
             *([f"- bound (bench --gemm-floor): eager / {CONV_ONLY}, eager's 1x1 conv alone "
                "(its GEMMs, no upsample or add): the most any fused kernel whose GEMMs are as "
                "fast as eager's can gain over eager there."]
               if any(r["impl"] == CONV_ONLY for r in result["rows"]) else []),
             "- at peak (total): the faster of eager and torch.compile against the time the "
             "levels' GEMM FLOPs take at the measured GEMM peak of the dtype: the most a kernel "
             "whose GEMMs run at that peak can reach against the faster baseline.",
             "- auto picks: the backend `backend=\"auto\"` chose for each level on this "
             "machine; auto total: the sum of those backends' medians (eager's math through "
             "the op where it picked eager) vs eager / vs torch.compile."]
    return "\n".join([machine_line(result), "", levels_line(result), "", *lines, "", *notes]) + "\n"


def plot(result: dict, path: str | Path) -> None:
    """Speedup over eager per level (and the total), one bar per implementation, one panel per
    (dtype, layout, direction)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []  # the levels of each group, then its end-to-end neck in a panel of its own
    for key, rows in grouped(result["rows"]):
        for section, title in (("level", ""), ("neck", ", end-to-end neck")):
            mine = [r for r in rows if r["section"] == section and r["impl"] != r["baseline"]]
            if mine:
                panels.append((group_title(key) + title, mine, mine[0]["baseline"]))
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    every_impl = list(dict.fromkeys(r["impl"] for _, rows, _ in panels for r in rows))
    color = {impl: palette[i % len(palette)] for i, impl in enumerate(every_impl)}
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 3.6 * len(panels)), squeeze=False)
    for ax, (title, rows, baseline) in zip(axes[:, 0], panels, strict=True):
        levels = list(dict.fromkeys(r["level"] for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        width = 0.8 / len(impls)
        for i, impl in enumerate(impls):
            mine = [r for r in rows if r["impl"] == impl]
            xs = [levels.index(r["level"]) + (i - (len(impls) - 1) / 2) * width for r in mine]
            bars = ax.bar(xs, [r["speedup_vs_eager"] for r in mine], width, label=impl,
                          color=color[impl])
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_xticks(range(len(levels)), levels)
        ax.set_ylabel(f"speedup over {baseline}")
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.25)  # headroom, so the legend does not cover the bars' labels
        ax.legend(fontsize=8, ncols=min(4, len(impls)), loc="upper left")
    fig.suptitle(machine_line(result), fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m fpn_kernels.cli.report",
                                     description="Render a `bench --json` file as markdown.")
    parser.add_argument("json_file")
    parser.add_argument("--plot", metavar="FILE.png", help="also draw the speedup bars")
    parser.add_argument("--summary", action="store_true",
                        help="one table of --impl's speedups per case and level, and what "
                             "backend='auto' gets, instead of the full tables")
    parser.add_argument("--impl", default="cpu", help="the summary's implementation (cpu)")
    args = parser.parse_args(argv)
    result = json.loads(Path(args.json_file).read_text())
    sys.stdout.write(summary(result, args.impl) if args.summary else markdown(result))
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
