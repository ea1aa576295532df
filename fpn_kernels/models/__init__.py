"""Model definitions built on the fused op."""

from .tiny_fpn import TinyFPN

__all__ = ["TinyFPN"]
