"""mmdetection 3.x: :class:`FusedMMDetFPN`, ``mmdet.models.necks.FPN`` with fused merges.

mmdet's forward (mmdet 3.3.0, ``mmdet/models/necks/fpn.py``) computes every lateral
``lateral_convs[i](inputs[i + start_level])`` first, then top-down ``laterals[i - 1] =
laterals[i - 1] + F.interpolate(laterals[i], **upsample_cfg)`` (with ``size=laterals[i -
1].shape[2:]`` unless ``upsample_cfg`` has a ``scale_factor``), then ``fpn_convs`` and the extra
levels. :class:`FusedMMDetFPN` computes each merge as one :func:`upsample_add_conv1x1` call when
it is exactly that function:

* ``upsample_cfg`` holds only ``mode`` ("nearest" or "nearest-exact", the default "nearest")
  and optionally ``scale_factor`` (whose output size must be the lateral's; otherwise mmdet's
  own expression runs and fails, or broadcasts, as it does);
* the lateral is mmcv's ``ConvModule`` running a plain 1x1 ``nn.Conv2d`` (stride 1, groups 1,
  no padding layer), no activation, and either no norm or one after the conv that is a fixed
  per-channel map now (eval-mode BatchNorm/SyncBatchNorm, folded on every forward), with no
  hooks on it.

Everything else (GN, activations, bilinear, ``align_corners``, BN with batch statistics) runs
mmdet's own expression, so results stay exact. Importing this module imports mmdet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmdet.models.necks.fpn import FPN
from mmdet.registry import MODELS
from torch import Tensor, nn

from ..modules import _check_backend
from ..ops import upsample_add_conv1x1
from ._common import (
    Block,
    FusedNeck,
    class_path,
    conv_norm_block,
    eager_notes,
    fold,
    hook_reason,
    scale_fits,
    scale_reason,
)

__all__ = ["FusedMMDetFPN"]

NAME = "mmdet"
FPN_PATH = "mmdet.models.necks.fpn.FPN"


def merge_kwargs(upsample_cfg: object) -> dict[str, Any] | str:
    """The op's ``mode`` and ``scale_factor`` for mmdet's ``upsample_cfg``, or why it has none."""
    if not isinstance(upsample_cfg, Mapping):
        return f"upsample_cfg is a {type(upsample_cfg).__name__}, not a dict"
    others = sorted(str(k) for k in upsample_cfg if k not in ("mode", "scale_factor"))
    if others:
        return f"upsample_cfg has {others} (only 'mode' and 'scale_factor' are fused)"
    mode = upsample_cfg.get("mode", "nearest")
    if mode not in ("nearest", "nearest-exact") or not isinstance(mode, str):
        return f"upsample_cfg mode {mode!r} (only 'nearest' and 'nearest-exact' are fused)"
    if "scale_factor" not in upsample_cfg:
        return {"mode": mode, "scale_factor": None}
    scale = upsample_cfg["scale_factor"]
    reason = "scale_factor None" if scale is None else scale_reason(scale)
    if reason is not None:
        return f"upsample_cfg {reason}"
    return {"mode": mode, "scale_factor": scale}


def lateral_block(module: Any) -> Block:
    """mmcv's ``ConvModule`` as the block fused_lateral folds, or why it is not one."""
    # ``module`` is any nn.Module. Typed Any: mmcv ships no types, so mypy cannot narrow it to
    # ConvModule by the check below, nor know a ConvModule's attributes.
    if type(module) is not ConvModule:
        return f"{class_path(type(module))} is not mmcv's ConvModule"
    if module.with_activation:
        return f"activation {type(module.activate).__name__} after the conv"
    if module.with_explicit_padding:
        return f"padding layer {type(module.padding_layer).__name__} before the conv"
    if module.with_norm and module.order.index("norm") < module.order.index("conv"):
        return f"norm before the conv (order={module.order})"
    return hook_reason(module) or conv_norm_block(
        module.conv, module.norm if module.with_norm else None
    )


class FusedMMDetFPN(FusedNeck, FPN):
    """``mmdet.models.necks.FPN`` whose top-down merges run the fused op where that is exact.

    Same constructor (plus ``backend``), submodules, ``state_dict`` keys, inputs (a tuple of
    features, finest first) and outputs (a tuple) as mmdet's FPN; ``isinstance(m, FPN)`` holds.
    Registered in mmdet's ``MODELS`` as ``"FusedMMDetFPN"``, so a config can name it.

    Args:
        *args, **kwargs: as for mmdet's FPN.
        backend: "auto" or a name from :func:`fpn_kernels.available_backends`.
    """

    _base = FPN

    def __init__(self, *args: Any, backend: str = "auto", **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.backend = _check_backend(backend)

    @classmethod
    def from_mmdet(cls, neck: FPN, backend: str = "auto") -> FusedMMDetFPN:
        """A ``FusedMMDetFPN`` sharing ``neck``'s submodules (parameters, buffers), training
        mode and hooks; ``neck`` itself is left as it is. Only ``type(neck) is FPN``: PAFPN and
        other subclasses have their own forward."""
        return cls._retyped_from(neck, backend)

    def to_mmdet(self) -> FPN:
        """A plain mmdet ``FPN`` sharing this module's submodules."""
        return self._retyped_back()

    def forward(self, inputs: tuple[Tensor, ...]) -> tuple:
        assert len(inputs) == len(self.in_channels)
        # The op's mode and scale_factor, or why it cannot run; Any because the loop reads them
        # only for a lateral with a fold, and folds exist only in the first case.
        kwargs: Any = merge_kwargs(self.upsample_cfg)
        n = len(self.lateral_convs)
        # Folded (weight, bias) of every lateral that gets merged with a coarser level.
        folds: list[tuple[Tensor, Tensor | None] | None] = [None] * n
        if not isinstance(kwargs, str):
            folds[: n - 1] = [fold(lateral_block(m)) for m in list(self.lateral_convs)[: n - 1]]
        # mmdet computes all laterals first; the fused ones are computed by their merge.
        laterals: list[Tensor | None] = [
            lateral_conv(inputs[i + self.start_level]) if folds[i] is None else None
            for i, lateral_conv in enumerate(self.lateral_convs)
        ]
        for i in range(n - 1, 0, -1):
            feature, top = inputs[i - 1 + self.start_level], laterals[i]
            assert top is not None  # the top level's lateral, or the last iteration's merge
            folded = folds[i - 1]
            if folded is not None and scale_fits(top, feature, kwargs["scale_factor"]):
                weight, bias = folded
                laterals[i - 1] = upsample_add_conv1x1(feature, weight, bias, top, **kwargs,
                                                       backend=self.backend)
                continue
            if laterals[i - 1] is None:  # fusable, but the scale factor misses the size
                laterals[i - 1] = self.lateral_convs[i - 1](feature)
            lateral = laterals[i - 1]
            assert lateral is not None  # set just above if it was None
            # mmdet's expression, which fails (or broadcasts) exactly as mmdet does.
            if "scale_factor" in self.upsample_cfg:
                laterals[i - 1] = lateral + F.interpolate(top, **self.upsample_cfg)
            else:
                prev_shape = lateral.shape[2:]
                laterals[i - 1] = lateral + F.interpolate(
                    top, size=prev_shape, **self.upsample_cfg)
        # Every lateral is computed or merged by now.
        return self._outputs(inputs, cast("list[Tensor]", laterals))

    def _outputs(self, inputs: tuple[Tensor, ...], laterals: list[Tensor]) -> tuple:
        """mmdet's outputs from the merged laterals: fpn_convs, then the extra levels."""
        used = len(laterals)
        outs = [self.fpn_convs[i](laterals[i]) for i in range(used)]
        if self.num_outs > len(outs):
            if not self.add_extra_convs:  # max pool on the last output (Faster R-CNN)
                for _ in range(self.num_outs - used):
                    outs.append(F.max_pool2d(outs[-1], 1, stride=2))
            else:  # extra convs (RetinaNet)
                if self.add_extra_convs == "on_input":
                    extra_source = inputs[self.backbone_end_level - 1]
                elif self.add_extra_convs == "on_lateral":
                    extra_source = laterals[-1]
                elif self.add_extra_convs == "on_output":
                    extra_source = outs[-1]
                else:
                    raise NotImplementedError
                outs.append(self.fpn_convs[used](extra_source))
                for i in range(used + 1, self.num_outs):
                    source = F.relu(outs[-1]) if self.relu_before_extra_convs else outs[-1]
                    outs.append(self.fpn_convs[i](source))
        return tuple(outs)


MODELS.register_module(name="FusedMMDetFPN", module=FusedMMDetFPN, force=True)

FUSED = FusedMMDetFPN


def skip_reason(neck: FPN) -> str | None:
    """Why ``neck`` is left alone (nothing in it can ever be fused), or None."""
    kwargs = merge_kwargs(neck.upsample_cfg)
    return kwargs if isinstance(kwargs, str) else None


def eager_merges(neck: FPN) -> list[str]:
    """The merges that run mmdet's expression now, and why."""
    laterals = list(neck.lateral_convs)[:-1]  # the top level has no merge
    return eager_notes((f"lateral_convs.{i}", lateral_block(m)) for i, m in enumerate(laterals))


def fused(neck: FPN, backend: str) -> nn.Module:
    return FusedMMDetFPN.from_mmdet(neck, backend)
