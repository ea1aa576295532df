"""ONNX Runtime against PyTorch with fpn_kernels, on CPU: the converted backbone of Faster R-CNN
ResNet-50-FPN, and its FPN neck alone, exported with the default (dynamo) exporter.

    python -m benchmarks.onnx_runtime [--image 800x1216] [--batch 1] [--out FILE]

Every row is timed in one run, interleaved round-robin (``fpn_kernels.cli.timing``), medians.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import warnings

import torch

import fpn_kernels
from fpn_kernels.cli.machine import machine_info
from fpn_kernels.cli.neck_bench import R50_IN_CHANNELS, neck_inputs
from fpn_kernels.cli.timing import TimingPolicy, time_round_robin


def _session(model, args):
    import onnxruntime as ort

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, f)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same cores as PyTorch
    sess = ort.InferenceSession(f.getvalue(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feeds = dict(zip(names, [a.numpy() for a in args], strict=True))
    return lambda: sess.run(None, feeds)


def cases(image_hw, batch):
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from torchvision.ops import FeaturePyramidNetwork
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    torch.manual_seed(0)
    backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None).eval()
    converted = fpn_kernels.convert(copy.deepcopy(backbone))
    image = torch.randn(batch, 3, *image_hw)
    neck = FeaturePyramidNetwork(list(R50_IN_CHANNELS), 256, LastLevelMaxPool()).eval()
    fused_neck = fpn_kernels.convert(copy.deepcopy(neck))
    features = neck_inputs(batch, torch.float32, False, "cpu", image_hw)

    class Neck(torch.nn.Module):  # the neck with positional inputs, as ONNX takes them
        def __init__(self, fpn):
            super().__init__()
            self.fpn = fpn

        def forward(self, c2, c3, c4, c5):
            return list(self.fpn(dict(zip("0123", (c2, c3, c4, c5), strict=True))).values())

    feature_args = tuple(features.values())
    return {
        "backbone": {
            "torchvision (PyTorch)": lambda: backbone(image),
            "converted (PyTorch + fpn_kernels)": lambda: converted(image),
            "converted (ONNX Runtime)": _session(converted, (image,)),
        },
        "neck": {
            "torchvision (PyTorch)": lambda: neck(features),
            "converted (PyTorch + fpn_kernels)": lambda: fused_neck(features),
            "converted (ONNX Runtime)": _session(Neck(fused_neck), feature_args),
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default="800x1216", help="H x W of the image")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    image_hw = tuple(int(s) for s in args.image.lower().split("x"))
    policy = TimingPolicy(min_repeats=7, budget_s=6.0)
    results = {"machine": machine_info("cpu"), "torch": torch.__version__,
               "python": platform.python_version(), "threads": torch.get_num_threads(),
               "image_hw": image_hw, "batch": args.batch, "cases": {}}
    import onnxruntime

    results["onnxruntime"] = onnxruntime.__version__
    with torch.inference_mode(False), torch.no_grad():
        for case, fns in cases(image_hw, args.batch).items():
            timings = time_round_robin(fns, policy)
            ort_ms = timings["converted (ONNX Runtime)"].median_ms
            results["cases"][case] = {name: t.as_dict() for name, t in timings.items()}
            print(f"{case}:")
            for name, t in timings.items():
                print(f"  {name:36s} {t.median_ms:9.1f} ms  (p20-p80 {t.p20_ms:.1f}-"
                      f"{t.p80_ms:.1f}; {t.median_ms / ort_ms:.2f}x ONNX Runtime's time)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
