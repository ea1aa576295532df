"""What the framework converters share: class paths, adapters that present a framework's lateral
block to :func:`fpn_kernels.modules.fused_lateral` (the one norm-folding routine), the checks
that decide whether a merge may run fused, and the base of the fused subclasses."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import TypeVar

from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from ..modules import _check_backend, _is_plain_1x1, _retyped, fused_lateral

_Module = TypeVar("_Module", bound=nn.Module)

# A lateral as fused_lateral takes it (a conv, or Sequential(conv, norm)), or why there is none.
Block = nn.Module | str


def class_path(cls: type) -> str:
    """``package.module.Class``: how a class is recognized without importing its framework."""
    return f"{cls.__module__}.{cls.__qualname__}"


def view_as(module: nn.Module, cls: type[_Module]) -> _Module:
    """``module`` seen as an instance of ``cls``: a new object holding, attribute by attribute,
    what ``module`` holds now under the names a ``cls`` instance has (:data:`_VIEW_ATTRIBUTES`):
    its parameter, buffer, submodule and hook containers themselves (so ``module.to(...)``
    shows through), its flags and hyperparameters as they are. For reading a module with code
    written for ``cls`` when the two compute the same function (detectron2's Conv2d is
    ``nn.Conv2d``'s conv; its FrozenBatchNorm2d is torchvision's); built afresh on every call.
    Name by name rather than by sharing ``__dict__``: torch 2.11's dynamo traces neither a
    module's ``__dict__`` nor one swapped in by ``object.__setattr__``, so
    ``torch.compile(fullgraph=True)`` of a converted model needs this form."""
    view = cls.__new__(cls)
    for name in _VIEW_ATTRIBUTES[cls]:
        object.__setattr__(view, name, getattr(module, name))
    return view


def hook_reason(*modules: nn.Module | None) -> str | None:
    """Why ``modules`` must be called rather than read (hooks run only in ``__call__``; e.g.
    ``nn.utils.spectral_norm`` computes the weight in a pre-hook), or None."""
    for m in modules:
        if m is not None and (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                              or m._backward_pre_hooks):
            return f"{type(m).__name__} has hooks, which run only when it is called"
    return None


# Framework norms, by class path, that compute what a torch or torchvision norm computes.
NORM_VIEWS: dict[str, type[nn.Module]] = {
    "detectron2.layers.batch_norm.FrozenBatchNorm2d": FrozenBatchNorm2d,
    # BatchNorm2d in eval mode (its fold needs eval mode) and outside distributed training.
    "detectron2.layers.batch_norm.NaiveSyncBatchNorm": nn.BatchNorm2d,
    # mmdet's "SyncBN": only its input-dimension check differs from torch's.
    "mmengine.utils.dl_utils.parrots_wrapper.SyncBatchNorm": nn.SyncBatchNorm,
}
# Every class a module is viewed as (view_as). Annotated: mypy joins the class object nn.Conv2d
# and type[nn.Module] to object.
_VIEWED_CLASSES: tuple[type[nn.Module], ...] = (nn.Conv2d, *NORM_VIEWS.values())
# The instance attributes of each, read once from an instance of it.
_VIEW_ATTRIBUTES: dict[type[nn.Module], tuple[str, ...]] = {
    cls: tuple(vars(cls(1, 1, 1) if issubclass(cls, nn.Conv2d) else cls(1)))
    for cls in _VIEWED_CLASSES
}


def conv_norm_block(conv: nn.Module, norm: nn.Module | None) -> Block:
    """The torchvision-style block for ``norm(conv(x))`` (``norm`` may be None), with a
    framework's norm seen as the torch/torchvision class it equals (:data:`NORM_VIEWS`)."""
    reason = hook_reason(conv, norm)
    if reason is not None:
        return reason
    if norm is None:
        return conv
    view = NORM_VIEWS.get(class_path(type(norm)))
    return nn.Sequential(conv, norm if view is None else view_as(norm, view))


def fold(block: Block) -> tuple[Tensor, Tensor | None] | None:
    """``(weight, bias)`` of the 1x1 conv that computes ``block`` now, or None."""
    return None if isinstance(block, str) else fused_lateral(block)


def eager_reason(block: Block) -> str:
    """Why :func:`fold` gives None for ``block``, in words."""
    if isinstance(block, str):
        return block
    layers = list(block) if isinstance(block, nn.Sequential) else [block]
    conv = layers[0]
    if not _is_plain_1x1(conv):
        shape = {k: getattr(conv, k, None) for k in ("kernel_size", "stride", "padding", "groups")}
        return f"{type(conv).__name__} is not a plain 1x1 conv ({shape})"
    if len(layers) > 2:
        return f"{', '.join(type(m).__name__ for m in layers[1:])} after the conv"
    norm = layers[1]
    mode = " in training mode" if norm.training else ""
    return f"{type(norm).__name__}{mode} is not a fixed per-channel affine map"


def eager_notes(laterals: Iterable[tuple[str, Block]]) -> list[str]:
    """``"name: why"`` for each ``(name, block)`` whose merge runs eager now."""
    return [f"{name}: {eager_reason(block)}" for name, block in laterals if fold(block) is None]


def scale_reason(scale_factor: object) -> str | None:
    """Why the op cannot take ``scale_factor`` as ``F.interpolate`` does, or None."""

    def real(s: object) -> bool:
        # The numbers.Real ABC declares only < and <=, so mypy rejects `s > 0`; the reals that
        # get here (int, float, numpy scalars, Fraction, ...) all define >.
        return (isinstance(s, numbers.Real) and not isinstance(s, bool) and math.isfinite(s)
                and s > 0)  # type: ignore[operator]

    if scale_factor is None or real(scale_factor):
        return None
    if isinstance(scale_factor, (tuple, list)) and len(scale_factor) == 2 and all(
        real(s) for s in scale_factor
    ):
        return None
    return f"scale_factor {scale_factor!r} is not a positive number or a pair of them"


def scale_fits(top: Tensor, lateral: Tensor, scale_factor: object) -> bool:
    """Whether ``F.interpolate(top, scale_factor=...)`` has ``lateral``'s size (its output size
    is ``floor(h * scale)``). When it does not, the framework's own expression raises (or
    broadcasts) and that is what must happen, so the merge runs eager."""
    if scale_factor is None:
        return True
    pair = scale_factor if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * 2
    return all(
        math.floor(float(t) * float(s)) == o
        for t, s, o in zip(top.shape[2:], pair, lateral.shape[2:], strict=True)
    )


class FusedNeck:
    """Base of the fused subclasses: ``_base`` is the framework's class they derive from."""

    _base: type[nn.Module]
    backend: str

    @classmethod
    def _retyped_from(cls, neck: nn.Module, backend: str):
        if type(neck) is not cls._base:
            # A subclass may override forward; replacing it would silently drop that.
            raise TypeError(
                f"neck: expected a {class_path(cls._base)}, got {class_path(type(neck))}"
            )
        new = _retyped(neck, cls)
        new.backend = _check_backend(backend)
        return new

    def _retyped_back(self) -> nn.Module:
        neck = _retyped(self, self._base)
        del neck.backend
        return neck

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
