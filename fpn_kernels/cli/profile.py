"""``python -m fpn_kernels profile``: what the Triton kernels cost, on paper.

1. Kernel resources, per kernel x config x dtype x layout x arch (sm_80, sm_90): registers per
   thread, shared memory per block, spilled bytes per thread and the tensor-core instruction,
   from an ahead-of-time compile (fpn_kernels/triton/aot.py): no GPU needed. The first run
   compiles (about two minutes on 2 cores), later runs read triton's cache.
2. A MODEL, not a measurement: the HBM bytes eager and fused move for each ResNet-50-FPN level at
   800x1216 (N=2, C_out=256), and the time they take at the H100 SXM's 3.35 TB/s
   (fpn_kernels/triton/roofline.py; fwd+bwd adds fpn_kernels/cli/roofline.py's backward model).
3. A MODEL too: the Triton backward's bytes as implemented, per launch (grad_out read by three
   launches, the fp32 split partials written and read back), with the split count the
   launcher picks (``triton.roofline.backward_bytes``).
"""

from __future__ import annotations

import argparse
import time

from ..triton.roofline import H100_SXM_BANDWIDTH, backward_bytes, bytes_moved, roofline_seconds
from .cases import resnet50_fpn_levels
from .roofline import bytes_moved as bench_bytes_moved

USES = ("forward", "grad_lateral", "grad_weight", "grad_top", "ordered_sum")
ELEMENT_SIZES = {"fp16": 2, "bf16": 2, "fp32": 4}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in (header, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def kernel_resources(archs: list[int], dtypes: list[str], uses: list[str], jobs: int) -> str:
    try:
        import triton

        from ..triton import aot
    except ImportError as exc:
        return f"kernel resources: skipped, triton is not importable ({exc})"
    variants = [v for v in aot.shipped_variants() if v.dtype in dtypes and v.use in uses]
    start = time.perf_counter()
    reports = aot.compile_all(variants, archs, jobs=jobs)
    took = time.perf_counter() - start
    header = ["kernel use", "config", "dtype", "layout", "arch", "regs", "smem KiB",
              "spill B", "MMA"]
    rows = []
    for r in reports:
        v = r.variant
        layout = {None: "-", False: "nchw", True: "nhwc"}[v.channels_last]
        dtype = v.dtype + (f"/{v.precision}" if v.precision else "")
        spill = r.stack_bytes + r.local_bytes
        rows.append([v.use, f"cfg{v.config_index}: {r.config}", dtype, layout, f"sm_{r.arch}",
                     str(r.registers), f"{r.shared_bytes / 1024:.0f}",
                     "0" if spill == 0 else f"{spill} SPILL", r.mma])
    spilled = sum(r.spills for r in reports)
    return (f"Kernel resources: ahead-of-time compile with triton {triton.__version__} "
            f"({len(reports)} kernels in {took:.0f} s; per thread: registers and spilled "
            f"stack/local bytes; per block: dynamic shared memory)\n"
            + _table(header, rows)
            + f"\n{spilled} of {len(reports)} spill registers.")


def roofline_model(bandwidth: float) -> str:
    levels = resnet50_fpn_levels(2, (800, 1216))
    header = ["level", "shape", "dtype", "eager MB", "fused MB", "ratio", "eager us", "fused us",
              "fwd+bwd eager MB", "fwd+bwd fused MB", "fwd+bwd eager us", "fwd+bwd fused us"]
    rows = []
    for level in levels:
        for dtype, size in (("fp16/bf16", 2), ("fp32", 4)):
            eager, fused = bytes_moved(level, size)
            train = [bench_bytes_moved(level, size, fused=f, direction="fwd+bwd")
                     for f in (False, True)]
            rows.append([
                level.name, level.describe(), dtype,
                f"{eager / 1e6:.1f}", f"{fused / 1e6:.1f}", f"{eager / fused:.2f}x",
                f"{roofline_seconds(eager, bandwidth) * 1e6:.1f}",
                f"{roofline_seconds(fused, bandwidth) * 1e6:.1f}",
                *(f"{b / 1e6:.1f}" for b in train),
                *(f"{roofline_seconds(b, bandwidth) * 1e6:.1f}" for b in train),
            ])
    return (f"HBM roofline MODEL (not a measurement): ResNet-50-FPN at 800x1216, N=2, C_out=256; "
            f"time = bytes / {bandwidth / 1e12:.2f} TB/s (H100 SXM: 3.35), the memory-bound "
            f"lower bound. Bytes: DESIGN.md's formulas.\n" + _table(header, rows))


def triton_backward_model(bandwidth: float) -> str:
    try:
        from ..triton import kernels, launch
    except ImportError as exc:
        return f"Triton backward model: skipped, triton is not importable ({exc})"
    header = ["level", "dtype", "splits", "grad_lateral MB", "partials MB", "ordered sum MB",
              "grad_top MB", "total MB", "total us"]
    rows = []
    for level in resnet50_fpn_levels(2, (800, 1216)):
        for dtype, size in (("fp16/bf16", 2), ("fp32", 4)):
            config = kernels.CONV1X1_WEIGHT_GRAD_CONFIGS[size][0].kwargs
            tiles = (-(-level.c_out // config["BLOCK_CO"])) * (-(-level.c_in // config["BLOCK_CI"]))
            _, chunks = launch.weight_grad_split(level.n, level.pixels, tiles, config["BLOCK_K"])
            parts = backward_bytes(level, size, level.n * chunks)
            total = sum(parts.values())
            rows.append([level.name, dtype, str(level.n * chunks),
                         *(f"{b / 1e6:.1f}" for b in parts.values()), f"{total / 1e6:.1f}",
                         f"{roofline_seconds(total, bandwidth) * 1e6:.1f}"])
    return ("Triton backward bytes AS IMPLEMENTED, a MODEL (not a measurement): one launch per "
            "column, grad_out read by three of them; time = bytes / "
            f"{bandwidth / 1e12:.2f} TB/s.\n" + _table(header, rows))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fpn_kernels profile",
        description="Triton kernel resources (AOT compile, no GPU needed) and the HBM roofline "
                    "model of the FPN merge.",
    )
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=[80, 90],
                        help="compute capabilities to compile for (default: 80 90)")
    parser.add_argument("--dtype", nargs="+", default=list(ELEMENT_SIZES),
                        choices=list(ELEMENT_SIZES))
    parser.add_argument("--use", nargs="+", default=list(USES), choices=USES,
                        help="which kernels (by what they compute)")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--bandwidth", type=float, default=H100_SXM_BANDWIDTH,
                        help="HBM bytes/s for the model (default: H100 SXM, 3.35e12)")
    parser.add_argument("--model-only", action="store_true",
                        help="print only the roofline model, compile nothing")
    args = parser.parse_args(argv)
    if not args.model_only:
        print(kernel_resources(args.arch, args.dtype, args.use, args.jobs))
        print()
    print(roofline_model(args.bandwidth))
    print()
    print(triton_backward_model(args.bandwidth))
    return 0
