"""A test-only stand-in for ``mmcv._ext``, the compiled ops that mmcv-lite does not ship.

``import mmdet.models`` imports ``mmcv.ops`` on the way to the necks, and ``mmcv.ops`` loads
``mmcv._ext`` and checks that each op it binds exists. The stand-in has every name; calling
any of them raises, so a test that reached a compiled op would fail loudly. FPN uses none.
"""

from __future__ import annotations

import importlib.util
import sys
import types


class _MissingExtension(types.ModuleType):
    def __getattr__(self, name: str):
        if name.startswith("__"):  # module protocol (__file__, __path__, ...): not an op
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise RuntimeError(
                f"mmcv._ext.{name}: mmcv-lite has no compiled ops; this is the test stand-in "
                "from tests/_mmcv_stub.py"
            )

        op.__name__ = name
        return op


def install() -> bool:
    """Put the stand-in in ``sys.modules`` unless a real ``mmcv._ext`` exists (full mmcv);
    returns whether it did. Call before ``import mmdet.models``."""
    if "mmcv._ext" in sys.modules:
        return isinstance(sys.modules["mmcv._ext"], _MissingExtension)
    if importlib.util.find_spec("mmcv") is None:
        return False
    if importlib.util.find_spec("mmcv._ext") is not None:
        return False
    sys.modules["mmcv._ext"] = _MissingExtension("mmcv._ext")
    return True
