"""torchvision's ``FeaturePyramidNetwork``: :class:`fpn_kernels.FusedFPN` does the work; this
module gives :func:`fpn_kernels.convert` what it reports about one."""

from __future__ import annotations

from torch import nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from ..modules import FusedFPN
from ._common import eager_notes

NAME = "torchvision"
FPN_PATH = "torchvision.ops.feature_pyramid_network.FeaturePyramidNetwork"
FUSED = FusedFPN


def skip_reason(fpn: nn.Module) -> str | None:
    """Why ``fpn`` (a torchvision FPN) is not converted, or None: it always is."""
    return None


def eager_merges(fpn: FeaturePyramidNetwork) -> list[str]:
    """The merges that run torchvision's expression now, and why."""
    blocks = list(fpn.inner_blocks)[:-1]  # the top level has no merge
    return eager_notes((f"inner_blocks.{i}", b) for i, b in enumerate(blocks))


def fused(fpn: nn.Module, backend: str) -> nn.Module:
    return FusedFPN.from_torchvision(fpn, backend)
