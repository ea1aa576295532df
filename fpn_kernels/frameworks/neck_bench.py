"""``python -m fpn_kernels.frameworks.neck_bench``: each framework's whole ResNet-50 FPN neck
against the same neck after :func:`fpn_kernels.convert`, forward, no grad, eval mode, fp32.

Necks (C2..C5 of 256/512/1024/2048 channels from an ``--image`` sized input, 256 out):
torchvision's (Faster R-CNN, LastLevelMaxPool); mmdet's Faster R-CNN neck (5 outputs, max
pool) and RetinaNet neck (start_level 1, ``on_input`` extra convs); detectron2's R50-FPN
(LastLevelMaxPool, ``--fuse-type``). mmdet and detectron2 are used when importable;
``--stand-ins DIR`` (the repository's ``tests``) supplies what is not: the ``mmcv._ext``
stand-in for mmcv-lite, and the tests' re-implementation of detectron2's FPN, which the output
then says. The neck's inputs are precomputed (detectron2's ``bottom_up`` returns them), so only
the neck is timed: interleaved rounds, medians (``fpn_kernels.cli.timing``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..cli import neck_bench as tv_bench
from ..cli.timing import TimingPolicy, time_round_robin
from ..modules import convert

Case = tuple[nn.Module, object]  # (neck, its input)


def _import_stand_in(directory: str | None, name: str):
    if directory is None:
        return None
    sys.path.insert(0, directory)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(directory)


def torchvision_cases(features) -> dict[str, Case]:
    reference, _ = tv_bench.neck_modules(torch.float32, False, "cpu")
    return {"torchvision R50-FPN": (reference, features)}


def mmdet_cases(features, stand_ins: str | None, notes: list[str]) -> dict[str, Case]:
    stub = _import_stand_in(stand_ins, "_mmcv_stub")
    if stub is not None and stub.install():
        notes.append("mmdet: mmcv._ext is the tests' stand-in (mmcv-lite); FPN uses no mmcv op")
    try:
        from mmdet.models.necks import FPN
    except ImportError as exc:
        notes.append(f"mmdet: not measured ({exc})")
        return {}
    inputs = tuple(features.values())
    channels = list(tv_bench.R50_IN_CHANNELS)
    necks = {
        "mmdet Faster R-CNN FPN": FPN(channels, tv_bench.OUT_CHANNELS, num_outs=5),
        "mmdet RetinaNet FPN": FPN(channels, tv_bench.OUT_CHANNELS, num_outs=5, start_level=1,
                                   add_extra_convs="on_input"),
    }
    return {name: (neck.eval(), inputs) for name, neck in necks.items()}


def detectron2_cases(features, stand_ins: str | None, fuse_type: str,
                     notes: list[str]) -> dict[str, Case]:
    try:
        fpn_module = importlib.import_module("detectron2.modeling.backbone.fpn")
        label = "detectron2"
    except ImportError as exc:
        stand_in = _import_stand_in(stand_ins, "_detectron2_fpn")
        if stand_in is None:
            notes.append(f"detectron2: not measured ({exc})")
            return {}
        stand_in_modules = stand_in.modules()
        sys.modules.update(stand_in_modules)
        fpn_module = stand_in_modules["detectron2.modeling.backbone.fpn"]
        label = "detectron2 (tests' re-implementation)"
        notes.append("detectron2: not installed; measured on tests/_detectron2_fpn.py")
    # Any: mypy accepts a class imported at run time as a base class only when it is Any.
    backbone: Any = importlib.import_module("detectron2.modeling.backbone.backbone").Backbone
    names = [f"res{i}" for i in range(2, 6)]
    by_name = dict(zip(names, features.values(), strict=True))

    class Features(backbone):  # a bottom_up that returns the precomputed C2..C5
        def __init__(self):
            super().__init__()
            self._out_features = names
            self._out_feature_channels = dict(zip(names, tv_bench.R50_IN_CHANNELS, strict=True))
            self._out_feature_strides = dict(zip(names, tv_bench.R50_STRIDES, strict=True))

        def forward(self, x):
            return by_name

    torch.manual_seed(0)
    fpn = fpn_module.FPN(Features(), names, tv_bench.OUT_CHANNELS,
                         top_block=fpn_module.LastLevelMaxPool(), fuse_type=fuse_type)
    return {f"{label} R50-FPN {fuse_type}": (fpn.eval(), None)}


def measure(cases: dict[str, Case], policy: TimingPolicy) -> list[dict]:
    rows = []
    for name, (neck, inputs) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nothing is skipped in these necks
            fused = convert(neck)  # a new module: the neck is the root, and stays as it is
        # Callable[..., Any]: mypy cannot infer a lambda with defaults against Callable[[], ...],
        # and a neck's output is a tuple or a dict of tensors, by framework.
        calls: dict[str, Callable[..., Any]] = {
            "framework": lambda n=neck, x=inputs: n(x), "fused": lambda f=fused, x=inputs: f(x)
        }
        with torch.no_grad():
            expected, got = calls["framework"](), calls["fused"]()
            if isinstance(expected, dict):
                expected, got = list(expected.values()), list(got.values())
            error = max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True))
            timings = time_round_robin(calls, policy)
        rows.append({"neck": name, "framework_ms": timings["framework"].median_ms,
                     "fused_ms": timings["fused"].median_ms,
                     "speedup": timings["framework"].median_ms / timings["fused"].median_ms,
                     "noisy": timings["framework"].noisy or timings["fused"].noisy,
                     "max_abs_err": error, "converted_to": type(fused).__name__})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fpn_kernels.frameworks.neck_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--image", default="800x1216", help="H x W of the image (C2 is 1/4)")
    parser.add_argument("--fuse-type", choices=["sum", "avg"], default="sum",
                        help="detectron2's fuse_type")
    parser.add_argument("--stand-ins", metavar="DIR",
                        help="the repository's tests/: stand-ins for mmcv._ext and detectron2")
    parser.add_argument("--repeats", type=int, default=7, help="at least this many rounds")
    args = parser.parse_args(argv)
    image_hw = tuple(int(s) for s in args.image.lower().split("x"))
    features = tv_bench.neck_inputs(args.batch, torch.float32, False, "cpu", image_hw=image_hw)
    notes: list[str] = []
    cases = {**torchvision_cases(features), **mmdet_cases(features, args.stand_ins, notes),
             **detectron2_cases(features, args.stand_ins, args.fuse_type, notes)}
    rows = measure(cases, TimingPolicy(min_repeats=args.repeats, budget_s=0.0))
    print(f"N={args.batch}, image {image_hw[0]}x{image_hw[1]}, float32 NCHW, forward, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print("\n| neck | framework ms | fused ms | speedup | max abs err |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        mark = "~" if r["noisy"] else ""
        print(f"| {r['neck']} | {r['framework_ms']:.1f}{mark} | {r['fused_ms']:.1f}{mark} | "
              f"{r['speedup']:.2f}x | {r['max_abs_err']:.1e} |")
    for note in notes:
        print(f"- {note}")
    print("- ~ noisy: the p20-p80 spread is over 10% of the median")
    return 0


if __name__ == "__main__":
    sys.exit(main())
