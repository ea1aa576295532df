"""detectron2's FPN, re-implemented for the tests from its documented semantics (current main:
``detectron2.modeling.backbone.fpn``, ``.backbone``, ``detectron2.layers``' ``Conv2d``,
``FrozenBatchNorm2d``, ``NaiveSyncBatchNorm``, ``get_norm``, ``ShapeSpec``), since detectron2
is not on PyPI. :func:`install` registers the classes under detectron2's own module paths, which
is all that :func:`fpn_kernels.convert` looks at.

What matters, and is reproduced here:

* ``Conv2d`` is an ``nn.Conv2d`` with ``.norm`` and ``.activation`` applied after
  ``F.conv2d(x, weight, bias, stride, padding, dilation, groups)``; FPN builds its convs with a
  bias only when ``norm == ""``.
* ``FrozenBatchNorm2d`` keeps weight, bias, running_mean and running_var as buffers; with an
  input that requires grad it computes ``x * scale + shift`` (``scale = weight *
  rsqrt(running_var + eps)``, cast to x's dtype), else ``F.batch_norm(training=False)``.
* ``NaiveSyncBatchNorm`` is ``BatchNorm2d`` on one process (and in eval mode).
* FPN: laterals and outputs registered as ``fpn_lateral{stage}``/``fpn_output{stage}`` (stage =
  log2 of the input's stride), kept in plain lists in top-down order; forward runs
  ``bottom_up(x)``, the coarsest lateral, then for each finer level ``lateral(feature) +
  F.interpolate(prev, scale_factor=2.0, mode="nearest")``, halved in place for
  ``fuse_type="avg"``, ``output_conv`` of each; the top block reads ``bottom_up`` features
  ``[in_feature]`` if present, else the output of that name; returns a dict over
  ``_out_features`` ("p2", ..., plus the top block's levels).
"""

from __future__ import annotations

import math
import sys
import types
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ShapeSpec:
    channels: int | None = None
    height: int | None = None
    width: int | None = None
    stride: int | None = None


class Conv2d(nn.Conv2d):
    def __init__(self, *args, norm=None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x):
        if x.numel() == 0 and self.training:
            assert not isinstance(self.norm, nn.SyncBatchNorm), "SyncBatchNorm: empty input"
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        if self.norm is not None:
            y = self.norm(y)
        if self.activation is not None:
            y = self.activation(y)
        return y


class FrozenBatchNorm2d(nn.Module):
    _version = 3

    def __init__(self, num_features, eps=1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        for name, value in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0)):
            self.register_buffer(name, torch.full((num_features,), value))
        self.register_buffer("running_var", torch.ones(num_features) - eps)
        self.register_buffer("num_batches_tracked", None)

    def forward(self, x):
        if not x.requires_grad:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                training=False, eps=self.eps)
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)


class NaiveSyncBatchNorm(nn.BatchNorm2d):
    def __init__(self, *args, stats_mode="", **kwargs):
        super().__init__(*args, **kwargs)
        self._stats_mode = stats_mode

    def forward(self, x):
        # World size 1 here: detectron2 then runs BatchNorm2d's forward.
        return super().forward(x)


def get_norm(norm, out_channels):
    if norm is None or norm == "":
        return None
    if isinstance(norm, str):
        norm = {
            "BN": nn.BatchNorm2d,
            "SyncBN": nn.SyncBatchNorm,
            "FrozenBN": FrozenBatchNorm2d,
            "GN": lambda c: nn.GroupNorm(32, c),
            "nnSyncBN": nn.SyncBatchNorm,
            "naiveSyncBN": NaiveSyncBatchNorm,
        }[norm]
    return norm(out_channels)


def c2_xavier_fill(module: nn.Module) -> None:
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class Backbone(nn.Module, metaclass=ABCMeta):
    @abstractmethod
    def forward(self):
        pass

    @property
    def size_divisibility(self) -> int:
        return 0

    @property
    def padding_constraints(self) -> dict[str, int]:
        return {}

    def output_shape(self):
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name])
                for name in self._out_features}


class FPN(Backbone):
    _fuse_type: torch.jit.Final[str]

    def __init__(self, bottom_up, in_features, out_channels, norm="", top_block=None,
                 fuse_type="sum", square_pad=0):
        super().__init__()
        assert isinstance(bottom_up, Backbone)
        assert in_features, in_features
        shapes = bottom_up.output_shape()
        strides = [shapes[f].stride for f in in_features]
        for finer, coarser in zip(strides, strides[1:], strict=False):
            assert coarser == 2 * finer, f"Strides {coarser} {finer} are not log2 contiguous"
        lateral_convs, output_convs = [], []
        use_bias = norm == ""
        for name, stride in zip(in_features, strides, strict=True):
            lateral = Conv2d(shapes[name].channels, out_channels, kernel_size=1, bias=use_bias,
                             norm=get_norm(norm, out_channels))
            output = Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1,
                            bias=use_bias, norm=get_norm(norm, out_channels))
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            stage = int(math.log2(stride))
            self.add_module(f"fpn_lateral{stage}", lateral)
            self.add_module(f"fpn_output{stage}", output)
            lateral_convs.append(lateral)
            output_convs.append(output)
        self.lateral_convs = lateral_convs[::-1]  # top-down order
        self.output_convs = output_convs[::-1]
        self.top_block = top_block
        self.in_features = tuple(in_features)
        self.bottom_up = bottom_up
        self._out_feature_strides = {f"p{int(math.log2(s))}": s for s in strides}
        if top_block is not None:
            for s in range(stage, stage + top_block.num_levels):
                self._out_feature_strides[f"p{s + 1}"] = 2 ** (s + 1)
        self._out_features = list(self._out_feature_strides)
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self._size_divisibility = strides[-1]
        self._square_pad = square_pad
        assert fuse_type in {"avg", "sum"}
        self._fuse_type = fuse_type

    @property
    def size_divisibility(self):
        return self._size_divisibility

    @property
    def padding_constraints(self):
        return {"square_size": self._square_pad}

    def forward(self, x):
        features = self.bottom_up(x)
        prev = self.lateral_convs[0](features[self.in_features[-1]])
        results = [self.output_convs[0](prev)]
        for idx, (lateral, output) in enumerate(zip(self.lateral_convs, self.output_convs,
                                                    strict=False)):
            if idx == 0:
                continue
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = lateral(features[self.in_features[-idx - 1]]) + top_down
            if self._fuse_type == "avg":
                prev /= 2
            results.insert(0, output(prev))
        if self.top_block is not None:
            name = self.top_block.in_feature
            source = (features[name] if name in features
                      else results[self._out_features.index(name)])
            results.extend(self.top_block(source))
        assert len(self._out_features) == len(results)
        return dict(zip(self._out_features, results, strict=True))


class LastLevelMaxPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.num_levels, self.in_feature = 1, "p5"

    def forward(self, x):
        return [F.max_pool2d(x, kernel_size=1, stride=2, padding=0)]


class LastLevelP6P7(nn.Module):
    def __init__(self, in_channels, out_channels, in_feature="res5"):
        super().__init__()
        self.num_levels, self.in_feature = 2, in_feature
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for m in (self.p6, self.p7):
            c2_xavier_fill(m)

    def forward(self, c5):
        p6 = self.p6(c5)
        return [p6, self.p7(F.relu(p6))]


_MODULES = {
    "detectron2.layers.shape_spec": [ShapeSpec],
    "detectron2.layers.wrappers": [Conv2d],
    "detectron2.layers.batch_norm": [FrozenBatchNorm2d, NaiveSyncBatchNorm, get_norm],
    "detectron2.modeling.backbone.backbone": [Backbone],
    "detectron2.modeling.backbone.fpn": [FPN, LastLevelMaxPool, LastLevelP6P7],
}
_PACKAGES = ["detectron2", "detectron2.layers", "detectron2.modeling",
             "detectron2.modeling.backbone"]


def modules() -> dict[str, types.ModuleType]:
    """detectron2's modules holding these classes (each class's ``__module__`` set to its
    detectron2 path) and their packages (which re-export them, as detectron2's do), for
    ``sys.modules``."""
    result = {name: types.ModuleType(name) for name in _PACKAGES}
    for name, members in _MODULES.items():
        result[name] = types.ModuleType(name)
        package = result[name.rsplit(".", 1)[0]]
        for obj in members:
            obj.__module__ = name
            setattr(result[name], obj.__name__, obj)
            setattr(package, obj.__name__, obj)
    return result


def install(monkeypatch) -> None:
    for name, module in modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    assert "detectron2" in sys.modules and sys.modules["detectron2"].__name__ == "detectron2"


# --------------------------------------------------------------------------- a bottom-up net


class TinyBottomUp(Backbone):
    """res2..res5 at strides 4..32 from 3x3 stride-2 convs (ceil halving, so odd image sizes
    give levels that 2x upsampling does not match)."""

    def __init__(self, channels=(3, 5, 7, 9, 11)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels[0], 3, 2, 1), nn.ReLU(),
                                  nn.Conv2d(channels[0], channels[1], 3, 2, 1))
        self.stages = nn.ModuleList(nn.Conv2d(a, b, 3, 2, 1)
                                    for a, b in zip(channels[1:], channels[2:], strict=False))
        self._out_features = ["res2", "res3", "res4", "res5"]
        self._out_feature_channels = dict(zip(self._out_features, channels[1:], strict=True))
        self._out_feature_strides = {f"res{i}": 2 ** i for i in range(2, 6)}

    def forward(self, x):
        x = self.stem(x)
        out = {"res2": x}
        for i, stage in enumerate(self.stages, 3):
            x = stage(torch.relu(x))
            out[f"res{i}"] = x
        return out
