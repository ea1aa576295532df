"""Loads the compiled extensions, each in its own try block, and remembers why one failed.

The extensions are plain shared libraries that register ops with the dispatcher
(TORCH_LIBRARY); they are found like modules (``fpn_kernels/_C*.so``) and loaded with
``torch.ops.load_library``.
"""

from __future__ import annotations

import importlib.util

import torch

_errors: dict[str, str] = {}


def load(name: str) -> str | None:
    """Load ``fpn_kernels.<name>``; None on success, else the reason it is missing."""
    if name not in _errors:
        try:
            spec = importlib.util.find_spec(f"fpn_kernels.{name}")
        except ImportError:
            spec = None
        if spec is None or spec.origin is None:
            _errors[name] = (
                f"fpn_kernels.{name} was not built (pip install --no-build-isolation -e .)"
            )
        else:
            try:
                torch.ops.load_library(spec.origin)
                _errors[name] = ""
            except OSError as exc:  # built against another torch, missing symbols, ...
                _errors[name] = f"fpn_kernels.{name} failed to load ({exc})"
    return _errors[name] or None
