"""What precision eager conv2d uses for float32 on CUDA (TF32 or IEEE)."""

from __future__ import annotations

import torch


def cudnn_conv_allows_tf32() -> bool:
    """ATen's ``allowTF32CuDNN("conv")``: ``cudnn.conv.fp32_precision``, else
    ``cudnn.fp32_precision``, else ``torch.backends.fp32_precision``; "none" means unset.
    The conv setting's starting value differs by version, and this follows ATen on each
    (tests/test_precision.py compares it with ``allowTF32CuDNN(CONV)`` itself): torch 2.11
    starts it at "tf32", so a parent set to "ieee" leaves conv2d on TF32; torch 2.14 starts it
    at "default", which reads back as the parents' setting.

    Reading the legacy ``torch.backends.cudnn.allow_tf32`` raises once a user has set precision
    through the newer ``fp32_precision`` settings, so it is consulted only on torch versions
    that have nothing else.
    """
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):  # torch < 2.9
        return bool(torch.backends.cudnn.allow_tf32)
    # torch.backends replaces itself in sys.modules with a module object whose class defines
    # fp32_precision (a property), so torch's stubs do not declare it.
    for precision in (conv.fp32_precision, torch.backends.cudnn.fp32_precision,
                      torch.backends.fp32_precision):  # type: ignore[attr-defined]
        if precision != "none":
            return precision == "tf32"
    return False
