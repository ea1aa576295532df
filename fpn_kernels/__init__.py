"""fpn_kernels: the FPN top-down merge (1x1 conv + nearest upsample + add) in one pass."""

from .backends import BackendUnavailableError, available_backends, backend_report
from .ops import upsample_add_conv1x1
from .reference import upsample_add_conv1x1_reference

__all__ = [
    "BackendUnavailableError",
    "available_backends",
    "backend_report",
    "upsample_add_conv1x1",
    "upsample_add_conv1x1_reference",
]
__version__ = "0.1.0"
