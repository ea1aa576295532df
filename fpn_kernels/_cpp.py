"""Loads the compiled extensions, each in its own try block, and remembers why one failed."""

from __future__ import annotations

import importlib

_errors: dict[str, str] = {}


def load(name: str) -> str | None:
    """Import ``fpn_kernels.<name>``; None on success, else the reason it is missing."""
    if name in _errors:
        return _errors[name] or None
    try:
        importlib.import_module(f"fpn_kernels.{name}")
        _errors[name] = ""
    except ImportError as exc:  # not built, or built against another torch
        _errors[name] = f"fpn_kernels.{name} not importable ({exc})"
    return _errors[name] or None
