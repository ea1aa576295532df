"""Drop-in modules: :class:`FusedFPN` (torchvision's ``FeaturePyramidNetwork`` with the fused
top-down merge) and :func:`convert`, which swaps it into existing models.

``FusedFPN`` subclasses torchvision's class, so it inherits the constructor, the submodules
(hence identical ``state_dict`` keys and the old-key migration in ``_load_from_state_dict``),
the parameter initialization and ``isinstance`` checks; only ``forward`` differs. For every
level below the top, torchvision computes ``inner_block(feature) + interpolate(last_inner,
size=feature's size, mode="nearest")``; here that is one :func:`upsample_add_conv1x1` call
whenever the inner block is a plain 1x1 conv, optionally followed by a norm that acts as a
fixed per-channel affine map (BatchNorm in eval mode, FrozenBatchNorm2d): the norm is folded
into the conv's weight and bias on every forward, which costs ``C_out * C_in`` multiplies and
can never go stale. Anything else (BatchNorm in training mode, which needs batch statistics,
GroupNorm, a conv that is not a plain 1x1) runs the eager expression, so results stay exact.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Callable
from typing import Optional, Protocol, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

from .backends import BACKENDS
from .ops import upsample_add_conv1x1

__all__ = ["FusedFPN", "convert"]

_T = TypeVar("_T")


def _check_backend(backend: object) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {list(BACKENDS)}, got {backend!r}")
    return backend


# --------------------------------------------------------------------------- norm folding


def _is_plain_1x1(conv: nn.Module) -> bool:
    """A conv whose output is exactly ``conv2d(x, weight.view(C_out, C_in, 1, 1), bias)``."""
    return (
        type(conv) is nn.Conv2d
        and conv.kernel_size == (1, 1)
        and conv.stride == (1, 1)
        and conv.padding in ((0, 0), "valid", "same")
        and conv.groups == 1
    )


_FOLDABLE_NORMS = (FrozenBatchNorm2d, nn.BatchNorm2d, nn.SyncBatchNorm)


class _FixedAffineNorm(Protocol):
    """What :func:`fused_lateral` reads from a norm that :func:`_is_fixed_affine_now` accepts:
    a FrozenBatchNorm2d, or a BatchNorm that has running statistics."""

    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor
    running_var: Tensor
    eps: float


def _is_fixed_affine_now(norm: nn.Module) -> bool:
    """Whether ``norm`` is, right now, a fixed per-channel affine map of its input."""
    if type(norm) is FrozenBatchNorm2d:
        return True
    # BatchNorm uses batch statistics in training mode, or whenever it tracks no running
    # statistics (the same condition as its own forward).
    return type(norm) in _FOLDABLE_NORMS and not (
        norm.training or norm.running_mean is None or norm.running_var is None
    )


def fold_norm_into_conv(
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],  # noqa: UP045 - TorchScript reads these annotations
    norm_weight: Optional[Tensor],  # noqa: UP045
    norm_bias: Optional[Tensor],  # noqa: UP045
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """The 1x1 ``(weight, bias)`` of a conv followed by a norm acting as the fixed map
    ``y * scale + shift`` with these statistics. Scriptable: the eager and the TorchScript
    paths of :class:`FusedFPN` fold with these same operations, so their bits agree."""
    inv_std = (running_var + eps).rsqrt()
    scale = inv_std if norm_weight is None else norm_weight * inv_std
    shift = -running_mean * scale
    if norm_bias is not None:
        shift = norm_bias + shift
    weight = conv_weight * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv_bias is None else conv_bias * scale + shift
    # A norm kept in another precision than the conv (as some mixed-precision setups do)
    # must not change the op's dtype.
    return weight.to(conv_weight.dtype), bias.to(conv_weight.dtype)


def _layers(inner_block: nn.Module) -> list[nn.Module]:
    return list(inner_block) if isinstance(inner_block, nn.Sequential) else [inner_block]


def foldable_structure(inner_block: nn.Module) -> bool:
    """A plain 1x1 conv, optionally followed by a norm of a kind that can be folded into it
    (whether it can be folded now also depends on its mode: see :func:`fused_lateral`)."""
    layers = _layers(inner_block)
    return (
        1 <= len(layers) <= 2
        and _is_plain_1x1(layers[0])
        and (len(layers) == 1 or type(layers[1]) in _FOLDABLE_NORMS)
    )


def fused_lateral(inner_block: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """The 1x1 ``(weight, bias)`` that computes ``inner_block(x)``, with a norm folded in;
    None when ``inner_block`` is not a plain 1x1 conv plus at most a foldable norm now."""
    if not foldable_structure(inner_block):
        return None
    conv, *norm = _layers(inner_block)
    conv = cast(nn.Conv2d, conv)  # foldable_structure: type(conv) is nn.Conv2d
    if not norm:
        return conv.weight, conv.bias
    if not _is_fixed_affine_now(norm[0]):
        return None
    n = cast(_FixedAffineNorm, norm[0])
    return fold_norm_into_conv(conv.weight, conv.bias, n.weight, n.bias, n.running_mean,
                               n.running_var, n.eps)


# --------------------------------------------------------------------------- FusedFPN


def _retyped(module: object, cls: type[_T]) -> _T:
    """A shallow copy of ``module`` whose class is ``cls``: the same submodules (so the same
    parameters and buffers, on the same device, in the same dtype), the same training flag and
    hooks; containers are copied so that later changes to one module leave the other alone."""
    new = cls.__new__(cls)
    new.__dict__.update(
        {k: copy.copy(v) if isinstance(v, (dict, set, list)) else v
         for k, v in module.__dict__.items()}
    )
    return new


class FusedFPN(FeaturePyramidNetwork):
    """``torchvision.ops.FeaturePyramidNetwork`` whose top-down merges run the fused op.

    Same constructor (plus ``backend``), same ``state_dict`` keys, same forward
    (``OrderedDict`` of features in increasing depth, ``OrderedDict`` out with the same names,
    highest resolution first); any ``ExtraFPNBlock`` works as in torchvision.

    Args:
        in_channels_list, out_channels, extra_blocks, norm_layer: as in torchvision.
        backend: "auto" or a name from :func:`fpn_kernels.available_backends`, passed to
            :func:`fpn_kernels.upsample_add_conv1x1` for every merge.
    """

    def __init__(
        self,
        in_channels_list: list[int],
        out_channels: int,
        extra_blocks: ExtraFPNBlock | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        backend: str = "auto",
    ):
        super().__init__(in_channels_list, out_channels, extra_blocks, norm_layer)
        self.backend = _check_backend(backend)

    @classmethod
    def from_torchvision(cls, fpn: FeaturePyramidNetwork, backend: str = "auto") -> FusedFPN:
        """A ``FusedFPN`` sharing ``fpn``'s submodules (parameters, buffers, extra blocks),
        device, dtype, training mode and hooks. ``fpn`` itself is left as it is."""
        if type(fpn) not in (FeaturePyramidNetwork, cls):
            # A subclass may override forward; replacing it would silently drop that.
            raise TypeError(
                "fpn: expected a torchvision.ops.FeaturePyramidNetwork, got "
                f"{type(fpn).__module__}.{type(fpn).__qualname__}"
            )
        new = _retyped(fpn, cls)
        new.backend = _check_backend(backend)
        return new

    def to_torchvision(self) -> FeaturePyramidNetwork:
        """A plain torchvision ``FeaturePyramidNetwork`` sharing this module's submodules."""
        fpn = _retyped(self, FeaturePyramidNetwork)
        del fpn.backend
        fpn.__dict__.pop("_script_foldable", None)
        return fpn

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

    @torch.jit.unused  # TorchScript runs _merge_scripted instead
    def _merge(self, idx: int, feature: Tensor, top: Tensor) -> Tensor:
        """``inner_blocks[idx](feature) + interpolate(top, size=feature's size)``."""
        inner_block = self.inner_blocks[idx]
        lateral = fused_lateral(inner_block)
        if lateral is None:
            # Exact eager fallback (e.g. BatchNorm with batch statistics), as torchvision.
            inner = inner_block(feature)
            return inner + F.interpolate(top, size=inner.shape[-2:], mode="nearest")
        weight, bias = lateral
        return upsample_add_conv1x1(feature, weight, bias, top, backend=self.backend)

    def __prepare_scriptable__(self) -> FusedFPN:
        """``torch.jit.script`` calls this first. TorchScript cannot check a module's exact
        type, so the structural half of :func:`fused_lateral` is recorded here, when the model
        is scripted; the module is otherwise untouched (it stays the user's eager model)."""
        self._script_foldable = [foldable_structure(block) for block in self.inner_blocks]
        return self

    def _merge_scripted(self, idx: int, feature: Tensor, top: Tensor) -> Tensor:
        """:meth:`_merge` in TorchScript, which indexes a ModuleList with literals only: the
        loop visits every inner block, compiled one by one (``hasattr`` is resolved per block
        at compile time), and merges at ``idx``. A BatchNorm's mode is read per call, like
        eager; the fold is :func:`fold_norm_into_conv`, as in eager, so the bits agree."""
        out = top
        for i, block in enumerate(self.inner_blocks):
            if i == idx:
                foldable = self._script_foldable[i] and feature.shape[0] > 0
                weight: Optional[Tensor] = None  # noqa: UP045 - TorchScript
                bias: Optional[Tensor] = None  # noqa: UP045
                if hasattr(block, "kernel_size"):  # a bare conv
                    weight, bias = block.weight, block.bias
                else:
                    for layer in block:  # Conv2dNormActivation: the conv, at most a norm
                        if hasattr(layer, "kernel_size"):
                            weight, bias = layer.weight, layer.bias
                        elif hasattr(layer, "running_var"):
                            if hasattr(layer, "momentum") and layer.training:
                                foldable = False  # BatchNorm on batch statistics
                            mean, var = layer.running_mean, layer.running_var
                            if weight is None or mean is None or var is None:
                                foldable = False
                            elif foldable:
                                weight, bias = fold_norm_into_conv(
                                    weight, bias, layer.weight, layer.bias, mean, var,
                                    layer.eps)
                if foldable and weight is not None:
                    out = torch.ops.fpn_kernels.upsample_add_conv1x1(
                        feature, weight, bias, top, "nearest", None, self.backend)
                else:
                    inner = block(feature)
                    out = inner + F.interpolate(top, size=inner.shape[-2:], mode="nearest")
        return out

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names = list(x.keys())
        features = list(x.values())
        # The top level has nothing above it: its inner block is torchvision's module as is.
        last_inner = self.get_result_from_inner_blocks(features[-1], -1)
        results = [self.get_result_from_layer_blocks(last_inner, -1)]
        for idx in range(len(features) - 2, -1, -1):
            if torch.jit.is_scripting():
                last_inner = self._merge_scripted(idx, features[idx], last_inner)
            else:
                last_inner = self._merge(idx, features[idx], last_inner)
            results.insert(0, self.get_result_from_layer_blocks(last_inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        # zip() truncates a mismatched extra block's output exactly as torchvision's does
        # (TorchScript's zip takes no strict=).
        return OrderedDict([(k, v) for k, v in zip(names, results)])  # noqa: B905


# --------------------------------------------------------------------------- convert


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every FPN inside ``model`` that fpn_kernels knows by its fused version sharing
    its parameters, in place, and return ``model``:

    * ``torchvision.ops.FeaturePyramidNetwork`` by :class:`FusedFPN`;
    * mmdetection 3.x's ``mmdet.models.necks.FPN`` by
      :class:`fpn_kernels.frameworks.mmdet.FusedMMDetFPN`;
    * detectron2's ``detectron2.modeling.backbone.fpn.FPN`` by its fused subclass
      (:func:`fpn_kernels.frameworks.detectron2.fused_class`).

    When ``model`` is itself such an FPN there is no parent to swap it in, so the fused module
    is returned instead. Subclasses of these classes (which may have their own forward, like
    mmdet's PAFPN) and FPNs with nothing to fuse are left alone; each is reported by a
    :class:`fpn_kernels.frameworks.ConversionWarning` naming its path, class and the reason, as
    is every merge of a converted FPN that runs eager now (e.g. BatchNorm in training mode).
    :func:`fpn_kernels.frameworks.convert_with_report` returns those records instead.
    """
    from . import frameworks  # imports this module

    return frameworks.convert(model, backend)
