"""fpn_kernels: the FPN top-down merge (1x1 conv + nearest upsample + add) in one pass."""

from typing import Any

from . import export  # noqa: F401  (registers the ONNX routes of the op)
from .backends import BackendUnavailableError, available_backends, backend_report
from .memory import (
    CpuOutputCacheInfo,
    cpu_output_cache_info,
    empty_cpu_output_cache,
    set_cpu_output_cache_limit,
)
from .ops import upsample_add_conv1x1
from .reference import upsample_add_conv1x1_reference

__all__ = [
    "BackendUnavailableError",
    "ConversionWarning",
    "CpuOutputCacheInfo",
    "FusedFPN",
    "available_backends",
    "backend_report",
    "convert",
    "convert_with_report",
    "cpu_output_cache_info",
    "empty_cpu_output_cache",
    "models",
    "set_cpu_output_cache_limit",
    "upsample_add_conv1x1",
    "upsample_add_conv1x1_reference",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The modules build on torchvision's FPN: imported on first use, so the op itself does not
    # pay for (or need) torchvision.
    if name in ("FusedFPN", "convert"):
        from . import modules

        return getattr(modules, name)
    if name in ("ConversionWarning", "convert_with_report"):
        from . import frameworks

        return getattr(frameworks, name)
    if name == "models":
        import importlib

        return importlib.import_module(".models", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
