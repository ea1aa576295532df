"""The end-to-end row of ``python -m fpn_kernels bench``: the whole FPN neck of Faster R-CNN
ResNet-50-FPN (in_channels 256/512/1024/2048, 256 out, LastLevelMaxPool; an 800x1216 image gives
C2..C5 of 200x304, 100x152, 50x76, 25x38), torchvision's module vs :class:`FusedFPN`, each
eager and under ``torch.compile``.

``neck_cases`` only builds ready-to-time callables; timing (warm-up, synchronization,
repetitions) is the caller's job.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
from torch import Tensor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..modules import FusedFPN

R50_IN_CHANNELS = (256, 512, 1024, 2048)
R50_STRIDES = (4, 8, 16, 32)  # of C2..C5
OUT_CHANNELS = 256
IMAGE_HW = (800, 1216)


def feature_sizes(image_hw: tuple[int, ...] = IMAGE_HW) -> list[tuple[int, int]]:
    """C2..C5 spatial sizes: every stride-2 stage of a ResNet rounds up."""
    return [(math.ceil(image_hw[0] / s), math.ceil(image_hw[1] / s)) for s in R50_STRIDES]


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def neck_inputs(
    batch: int, dtype: torch.dtype, channels_last: bool, device: torch.device | str,
    image_hw: tuple[int, ...] = IMAGE_HW, seed: int = 0,
) -> OrderedDict[str, Tensor]:
    """Random C2..C5, named "0".."3" as torchvision's BackboneWithFPN names them."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    features = OrderedDict()
    for i, (channels, hw) in enumerate(zip(R50_IN_CHANNELS, feature_sizes(image_hw),
                                           strict=True)):
        t = torch.randn(batch, channels, *hw, generator=gen)
        features[str(i)] = t.to(device=device, dtype=dtype).contiguous(
            memory_format=_memory_format(channels_last))
    return features


def neck_modules(
    dtype: torch.dtype, channels_last: bool, device: torch.device | str, seed: int = 0,
    backend: str = "auto",
) -> tuple[FeaturePyramidNetwork, FusedFPN]:
    """torchvision's R50-FPN neck in eval mode, and a FusedFPN sharing its weights."""
    with torch.random.fork_rng(devices=[]):  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        reference = FeaturePyramidNetwork(
            list(R50_IN_CHANNELS), OUT_CHANNELS, extra_blocks=LastLevelMaxPool()
        )
    reference = reference.to(device=device, dtype=dtype, memory_format=_memory_format(
        channels_last)).eval()
    return reference, FusedFPN.from_torchvision(reference, backend=backend)


def _no_grad_call(module: Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]],
                  features: Mapping[str, Tensor]) -> Callable[[], Mapping[str, Tensor]]:
    def call():
        with torch.no_grad():
            return module(features)

    return call


def neck_cases(
    batch: int, dtype: torch.dtype, channels_last: bool, device: torch.device | str, *,
    image_hw: tuple[int, int] = IMAGE_HW, backend: str = "auto",
) -> dict[str, Callable[[], Mapping[str, Tensor]]]:
    """Zero-argument callables, each running the whole neck once (no grad) on the same inputs
    and weights: "torchvision", "fused", "torchvision+compile", "fused+compile". The compiled
    ones compile on their first call (``fullgraph=True``: a graph break would fail loudly
    rather than time a split graph)."""
    features = neck_inputs(batch, dtype, channels_last, device, image_hw)
    reference, fused = neck_modules(dtype, channels_last, device, backend=backend)
    # Callables rather than nn.Module: torch.compile's stubs return a plain Callable.
    modules: dict[str, Callable[[Mapping[str, Tensor]], Mapping[str, Tensor]]] = {
        "torchvision": reference, "fused": fused}
    for name, module in list(modules.items()):
        modules[f"{name}+compile"] = torch.compile(module, fullgraph=True)
    return {name: _no_grad_call(module, features) for name, module in modules.items()}


def max_abs_error(
    cases: Mapping[str, Callable[[], Mapping[str, Tensor]]], name: str = "fused",
    reference: str = "torchvision",
) -> float:
    """The largest ``|cases[name]() - cases[reference]()|`` over every output level."""
    expected, got = cases[reference](), cases[name]()
    if list(got) != list(expected):
        raise ValueError(f"{name} returned levels {list(got)}, {reference} {list(expected)}")
    return max(
        (got[k].double() - expected[k].double()).abs().max().item() for k in expected
    )
