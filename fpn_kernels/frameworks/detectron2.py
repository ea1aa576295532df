"""detectron2: ``detectron2.modeling.backbone.fpn.FPN`` with fused merges, without importing
detectron2 (it is recognized by its class path; nothing here imports it).

detectron2's FPN (current main) is a ``Backbone`` holding ``bottom_up``; its forward runs
``bottom_up(x)``, then from the coarsest level down ``prev = lateral_conv(feature) +
F.interpolate(prev, scale_factor=2.0, mode="nearest")``, halved in place when ``fuse_type ==
"avg"``, ``output_conv(prev)`` per level, then the ``top_block`` (LastLevelMaxPool,
LastLevelP6P7, ...) on ``bottom_up_features[in_feature]`` if that exists, else on the output of
that name. The fused subclass (:func:`fused_class`, created from the instance's own class, so
``isinstance`` checks, ``output_shape``, ``size_divisibility`` and ``padding_constraints`` are
detectron2's) computes a merge as one :func:`upsample_add_conv1x1` call when the lateral is
detectron2's ``Conv2d`` (or ``nn.Conv2d``) as a plain 1x1 conv with no activation and no norm,
or a norm that is a fixed per-channel map now: ``FrozenBatchNorm2d``, eval-mode
``BatchNorm2d``/``SyncBatchNorm``/``NaiveSyncBatchNorm``, folded on every forward. GN, LN,
batch statistics, hooks and anything else run detectron2's expression, so results stay exact.

``fuse_type="avg"``: the 1/2 is folded into the op's inputs, ``op(x, W/2, b/2, prev/2)``.
Halving is exact in binary floating point (barring subnormals), so this is exactly the fused
sum halved, as eager halves its sum. It costs one pass over ``prev`` (a quarter of the output)
and two tiny ones over W and b, and needs no op argument in any backend.
"""

from __future__ import annotations

import importlib
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import upsample_add_conv1x1
from ._common import FusedNeck, class_path, conv_norm_block, eager_notes, fold, scale_fits, view_as

__all__ = ["fused_class"]

NAME = "detectron2"
FPN_PATH = "detectron2.modeling.backbone.fpn.FPN"
CONV_PATH = "detectron2.layers.wrappers.Conv2d"
SCALE = 2.0  # detectron2's fixed top-down scale factor


def lateral_block(conv: nn.Module) -> nn.Module | str:
    """detectron2's lateral ``Conv2d`` (conv, then ``.norm``, then ``.activation``) as the
    block fused_lateral folds, or why it is not one."""
    if type(conv) is nn.Conv2d:
        return conv_norm_block(conv, None)
    if class_path(type(conv)) != CONV_PATH:
        return f"{class_path(type(conv))} is not detectron2's Conv2d"
    if conv.activation is not None:
        return f"activation {getattr(conv.activation, '__name__', type(conv.activation).__name__)}"
    norm = conv.norm
    if norm is not None and not isinstance(norm, nn.Module):
        return f"norm {norm!r} is not a module"
    # The view shares conv's hooks, which conv_norm_block checks.
    return conv_norm_block(view_as(conv, nn.Conv2d), norm)


class _FusedForward(FusedNeck):
    """The forward of :func:`fused_class`'s subclasses."""

    _fuse_type: str  # set by detectron2's FPN, which every such subclass also derives from

    def to_detectron2(self) -> nn.Module:
        """A plain detectron2 ``FPN`` sharing this module's submodules."""
        return self._retyped_back()

    def forward(self, x):
        bottom_up_features = self.bottom_up(x)
        results = []
        prev_features = self.lateral_convs[0](bottom_up_features[self.in_features[-1]])
        results.append(self.output_convs[0](prev_features))
        pairs = list(zip(self.lateral_convs, self.output_convs, strict=False))
        for idx, (lateral_conv, output_conv) in enumerate(pairs[1:], 1):
            features = bottom_up_features[self.in_features[-idx - 1]]
            prev_features = self._merge(lateral_conv, features, prev_features)
            results.insert(0, output_conv(prev_features))
        if self.top_block is not None:
            source = self.top_block.in_feature
            if source in bottom_up_features:
                results.extend(self.top_block(bottom_up_features[source]))
            else:
                results.extend(self.top_block(results[self._out_features.index(source)]))
        assert len(self._out_features) == len(results)
        return dict(zip(self._out_features, results, strict=True))

    def _merge(self, lateral_conv: nn.Module, features: Tensor, prev: Tensor) -> Tensor:
        folded = fold(lateral_block(lateral_conv))
        if folded is None or not scale_fits(prev, features, SCALE):
            # detectron2's expression (which fails, or broadcasts, where the sizes differ).
            out = lateral_conv(features) + F.interpolate(prev, scale_factor=SCALE, mode="nearest")
            if self._fuse_type == "avg":
                out /= 2
            return out
        weight, bias = folded
        if self._fuse_type == "avg":
            weight, prev = weight * 0.5, prev * 0.5
            bias = None if bias is None else bias * 0.5
        return upsample_add_conv1x1(features, weight, bias, prev, scale_factor=SCALE,
                                    backend=self.backend)


_FUSED: dict[type, type] = {}


def fused_class(base: type[nn.Module]) -> type[nn.Module]:
    """The fused subclass of detectron2's FPN class ``base`` (one per class, created on first
    use; named ``fpn_kernels.frameworks.detectron2.FusedDetectron2FPN`` so that pickle finds
    it again through this module's ``__getattr__``)."""
    if not isinstance(base, type) or class_path(base) != FPN_PATH:
        got = class_path(base) if isinstance(base, type) else f"a {type(base).__name__}"
        raise TypeError(f"base: expected the class {FPN_PATH}, got {got}")
    cls = _FUSED.get(base)
    if cls is None:
        namespace = {"__module__": __name__, "__qualname__": "FusedDetectron2FPN", "_base": base,
                     "__doc__": f"{FPN_PATH} whose top-down merges run the fused op."}
        # type(base): detectron2's Backbone has ABCMeta as its metaclass. (mypy cannot type a
        # class created by calling a metaclass.)
        cls = _FUSED[base] = type(base)(  # type: ignore[misc]
            "FusedDetectron2FPN", (_FusedForward, base), namespace)
    return cls


def __getattr__(name: str):
    if name == "FusedDetectron2FPN":  # what pickle looks up; needs detectron2 importable
        return fused_class(importlib.import_module("detectron2.modeling.backbone.fpn").FPN)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def skip_reason(fpn: nn.Module) -> str | None:
    """Why ``fpn`` is left alone, or None."""
    if fpn._fuse_type not in ("sum", "avg"):
        return f"fuse_type {fpn._fuse_type!r} (only 'sum' and 'avg' are fused)"
    return None


def eager_merges(fpn: nn.Module) -> list[str]:
    """The merges that run detectron2's expression now, and why (by module name)."""
    names = {id(m): name for name, m in fpn.named_children()}
    # detectron2's FPN keeps its lateral convs in a plain list (each also a named child).
    return eager_notes((names.get(id(m), "?"), lateral_block(m))
                       for m in cast("list[nn.Module]", fpn.lateral_convs)[1:])


def fused(fpn: nn.Module, backend: str) -> nn.Module:
    # fused_class's classes derive from _FusedForward as well as from detectron2's FPN.
    return cast("type[_FusedForward]", fused_class(type(fpn)))._retyped_from(fpn, backend)
