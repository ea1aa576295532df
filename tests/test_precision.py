"""The TF32 decision follows what cuDNN conv would do, for the legacy and the new flags, in both
GPU backends (Triton: fpn_kernels.precision; CUDA: ATen's flag, read by csrc/cuda)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CASES = [
    ("", True),  # torch's default: cuDNN conv may use TF32
    ("torch.backends.cudnn.allow_tf32 = False", False),
    ("torch.backends.cudnn.conv.fp32_precision = 'ieee'", False),
    ("torch.backends.cudnn.conv.fp32_precision = 'tf32'", True),
    ("torch.backends.cudnn.fp32_precision = 'ieee'", False),
    ("torch.backends.fp32_precision = 'ieee'", False),
    ("torch.backends.fp32_precision = 'ieee'; torch.backends.cudnn.conv.fp32_precision = 'tf32'",
     True),
]


@pytest.mark.parametrize("setting,expected", CASES)
def test_cudnn_conv_allows_tf32(setting, expected):
    # A fresh process each: the flags are global, and the legacy getter raises once the new
    # API was used, which is the bug this guards against.
    # The CUDA backend's kernels read ATen's own flag (csrc/cuda: allowTF32CuDNN("conv")): one
    # fp32 rule for both GPU backends, checked here without a GPU where the library is built.
    script = textwrap.dedent(f"""
        import torch
        from fpn_kernels import _cpp
        from fpn_kernels.precision import cudnn_conv_allows_tf32
        {setting}
        print(cudnn_conv_allows_tf32())
        if _cpp.load("_C") is None and _cpp.load("_C_cuda") is None:
            print(torch.ops.fpn_kernels.cuda_fp32_as_tf32())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines[0] == str(expected), "fpn_kernels.precision (the Triton backend's rule)"
    if _cuda_library_built():
        assert lines[1:] == [str(expected)], "the CUDA backend's rule"


def _cuda_library_built() -> bool:
    import importlib.util

    return importlib.util.find_spec("fpn_kernels._C_cuda") is not None
