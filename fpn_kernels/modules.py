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
from typing import TypeVar

import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork
from torchvision.ops.misc import FrozenBatchNorm2d

from .backends import BACKENDS
from .ops import upsample_add_conv1x1

__all__ = ["FusedFPN", "convert"]

_Module = TypeVar("_Module", bound=nn.Module)


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


def _affine_of_norm(norm: nn.Module) -> tuple[Tensor, Tensor] | None:
    """``(scale, shift)`` with ``norm(y) == y * scale + shift`` per channel, computed from the
    norm's current parameters and buffers; None when the norm is not such a fixed map now."""
    if type(norm) is FrozenBatchNorm2d:
        weight, bias = norm.weight, norm.bias
    elif type(norm) in (nn.BatchNorm2d, nn.SyncBatchNorm):
        # BatchNorm uses batch statistics in training mode, or whenever it tracks no running
        # statistics (the same condition as its own forward).
        if norm.training or norm.running_mean is None or norm.running_var is None:
            return None
        weight, bias = norm.weight, norm.bias
    else:
        return None
    inv_std = (norm.running_var + norm.eps).rsqrt()
    scale = inv_std if weight is None else weight * inv_std
    shift = -norm.running_mean * scale
    return scale, shift if bias is None else bias + shift


def fused_lateral(inner_block: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """The 1x1 ``(weight, bias)`` that computes ``inner_block(x)``, with a norm folded in;
    None when ``inner_block`` is not a plain 1x1 conv plus at most a foldable norm."""
    layers = list(inner_block) if isinstance(inner_block, nn.Sequential) else [inner_block]
    if not 1 <= len(layers) <= 2 or not _is_plain_1x1(layers[0]):
        return None
    conv = layers[0]
    if len(layers) == 1:
        return conv.weight, conv.bias
    affine = _affine_of_norm(layers[1])
    if affine is None:
        return None
    scale, shift = affine
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias * scale + shift
    # A norm kept in another precision than the conv (as some mixed-precision setups do)
    # must not change the op's dtype.
    return weight.to(conv.weight.dtype), bias.to(conv.weight.dtype)


# --------------------------------------------------------------------------- FusedFPN


def _retyped(module: nn.Module, cls: type[_Module]) -> _Module:
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
        return fpn

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"

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

    def forward(self, x: dict[str, Tensor]) -> dict[str, Tensor]:
        names = list(x.keys())
        features = list(x.values())
        # The top level has nothing above it: its inner block is torchvision's module as is.
        last_inner = self.inner_blocks[-1](features[-1])
        results = [self.layer_blocks[-1](last_inner)]
        for idx in range(len(features) - 2, -1, -1):
            last_inner = self._merge(idx, features[idx], last_inner)
            results.insert(0, self.layer_blocks[idx](last_inner))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        # zip() truncates a mismatched extra block's output exactly as torchvision's does.
        return OrderedDict(zip(names, results, strict=False))


# --------------------------------------------------------------------------- convert


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every ``torchvision.ops.FeaturePyramidNetwork`` inside ``model`` by a
    :class:`FusedFPN` sharing its parameters, in place, and return ``model``.

    When ``model`` is itself a torchvision FPN there is no parent to swap it in, so the new
    ``FusedFPN`` is returned instead. Subclasses of torchvision's FPN (which may have their own
    forward) and existing ``FusedFPN`` modules are left alone.
    """
    _check_backend(backend)
    if type(model) is FeaturePyramidNetwork:
        return FusedFPN.from_torchvision(model, backend)
    converted: dict[int, FusedFPN] = {}  # one replacement per FPN, even where it is shared
    for parent in list(model.modules()):
        # _modules, not named_children(): that skips a module's second name, which must be
        # swapped as well.
        for name, child in list(parent._modules.items()):
            if type(child) is FeaturePyramidNetwork:
                if id(child) not in converted:
                    converted[id(child)] = FusedFPN.from_torchvision(child, backend)
                setattr(parent, name, converted[id(child)])
    return model
