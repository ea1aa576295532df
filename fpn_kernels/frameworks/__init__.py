"""FPNs of other frameworks, and what :func:`fpn_kernels.convert` does with each.

=============  =================================================  ==============================
framework      converted class (exactly; subclasses are skipped)  replaced by
=============  =================================================  ==============================
torchvision    ``torchvision.ops.FeaturePyramidNetwork``          :class:`fpn_kernels.FusedFPN`
mmdetection    ``mmdet.models.necks.FPN`` (3.x)                   :class:`.mmdet.FusedMMDetFPN`
detectron2     ``detectron2.modeling.backbone.fpn.FPN``           :func:`.detectron2.fused_class`
=============  =================================================  ==============================

Classes are recognized by their class path, so nothing here imports mmdet or detectron2 unless
the model holds one of their FPNs (then mmdet, which is already imported, is used; detectron2
never is). :func:`convert_with_report` returns what was done as :class:`Conversion` records;
:func:`fpn_kernels.convert` also warns (:class:`ConversionWarning`) about every FPN it left as it
is and every merge that runs eager now, and logs the converted ones (logger ``fpn_kernels``).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import warnings
from types import ModuleType
from typing import Literal

import torch
from torch import nn

from ..modules import _check_backend
from ._common import class_path

__all__ = ["Conversion", "ConversionWarning", "convert_with_report"]

logger = logging.getLogger("fpn_kernels")

# Framework modules, by the class path of the FPN each converts. Imported only when a model
# holds such an FPN.
_FRAMEWORKS = {
    "torchvision.ops.feature_pyramid_network.FeaturePyramidNetwork": ".torchvision",
    "mmdet.models.necks.fpn.FPN": ".mmdet",
    "detectron2.modeling.backbone.fpn.FPN": ".detectron2",
}
_FUSED_PATHS = {
    "fpn_kernels.modules.FusedFPN",
    "fpn_kernels.frameworks.mmdet.FusedMMDetFPN",
    "fpn_kernels.frameworks.detectron2.FusedDetectron2FPN",
}


class ConversionWarning(UserWarning):
    """:func:`fpn_kernels.convert` left an FPN as it is, or some of its merges run eager."""


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What :func:`convert_with_report` did with one FPN.

    Attributes:
        path: its name in the model (``"backbone.fpn"``; ``""`` for the model itself), the
            first one where it is reachable under several.
        cls: its class path, e.g. ``"mmdet.models.necks.fpn.FPN"``.
        framework: "torchvision", "mmdet" or "detectron2".
        status: "converted"; "skipped" (left as it is; ``reason`` says why); or
            "already-fused".
        reason: why it was skipped ("" otherwise).
        eager_merges: for a converted FPN, the merges that run the framework's own expression
            at present, each "submodule: why" (e.g. BatchNorm in training mode, which is fused
            again in eval mode; GroupNorm, which never is).
    """

    path: str
    cls: str
    framework: str
    status: Literal["converted", "skipped", "already-fused"]
    reason: str = ""
    eager_merges: tuple[str, ...] = ()

    def __str__(self) -> str:
        where = f"{self.path or '<model>'} ({self.cls})"
        if self.status == "skipped":
            return f"left {where} as it is: {self.reason}"
        if self.status == "already-fused":
            return f"{where} is already fused"
        eager = f"; running eager now: {'; '.join(self.eager_merges)}" if self.eager_merges else ""
        return f"converted {where}{eager}"


def _framework(path: str) -> ModuleType:
    return importlib.import_module(_FRAMEWORKS[path], __name__)


def _classify(module: nn.Module, path: str) -> tuple[Conversion | None, ModuleType | None]:
    """The record for ``module`` as it is, and the framework that converts it (None when it is
    not an FPN that fpn_kernels knows, or it is to be left alone)."""
    mro = [class_path(c) for c in type(module).__mro__]
    known = next((p for p in mro if p in _FRAMEWORKS), None)
    if known is None:
        return None, None
    name = _FRAMEWORKS[known].lstrip(".")

    def record(status, reason=""):
        return Conversion(path, mro[0], name, status, reason)

    if mro[0] in _FUSED_PATHS:
        return record("already-fused"), None
    if mro[0] != known:
        base = next((p for p in mro[1:] if p in _FUSED_PATHS), known)
        return record("skipped", f"a subclass of {base}, which may have its own forward; only "
                                 f"{known} itself is converted"), None
    framework = _framework(known)
    reason = framework.skip_reason(module)
    if reason is not None:
        return record("skipped", reason), None
    return record("converted"), framework


@torch.no_grad()  # the report folds norms to see which merges fuse
def convert_with_report(model: nn.Module, backend: str = "auto"
                        ) -> tuple[nn.Module, list[Conversion]]:
    """:func:`fpn_kernels.convert` without its warnings: ``(model, records)``, one
    :class:`Conversion` per FPN found (converted or not), in the order of
    ``model.named_modules()``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    _check_backend(backend)
    found: dict[int, tuple[Conversion | None, ModuleType | None]] = {}
    for path, module in model.named_modules():
        found[id(module)] = _classify(module, path)
    replaced: dict[int, nn.Module] = {}

    def replacement(module: nn.Module) -> nn.Module | None:
        record, framework = found.get(id(module), (None, None))
        if framework is None:
            return None
        if id(module) not in replaced:
            assert record is not None  # _classify gives a framework only with a record
            replaced[id(module)] = framework.fused(module, backend)
            found[id(module)] = (dataclasses.replace(
                record, eager_merges=tuple(framework.eager_merges(module))), framework)
        return replaced[id(module)]

    # Children before parents: an FPN nested in another one (detectron2's bottom_up) is swapped
    # before its parent is copied into a fused one.
    for parent in reversed(list(model.modules())):
        # _modules, not named_children(): that skips a module's second name.
        for name, child in list(parent._modules.items()):
            new = replacement(child) if child is not None else None
            if new is not None:
                setattr(parent, name, new)
    # The model itself has no parent to swap it in: its replacement is returned instead.
    new_model = replacement(model) or model
    records = [record for record, _ in found.values() if record is not None]
    return new_model, records


def convert(model: nn.Module, backend: str = "auto") -> nn.Module:
    """:func:`convert_with_report`, warning about what it skipped and what runs eager, and
    logging what it converted; returns the model (see :func:`fpn_kernels.convert`)."""
    model, records = convert_with_report(model, backend)
    for record in records:
        if record.status == "skipped" or record.eager_merges:
            warnings.warn(f"fpn_kernels.convert: {record}", ConversionWarning, stacklevel=3)
        if record.status == "converted":
            logger.info("fpn_kernels.convert: %s", record)
    return model


def __getattr__(name: str):
    if name == "FusedMMDetFPN":  # imports mmdet
        return importlib.import_module(".mmdet", __name__).FusedMMDetFPN
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
