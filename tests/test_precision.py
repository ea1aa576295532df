"""The TF32 decision follows what cuDNN conv would do, for the legacy and the new flags."""

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
    script = textwrap.dedent(f"""
        import torch
        from fpn_kernels.precision import cudnn_conv_allows_tf32
        {setting}
        print(cudnn_conv_allows_tf32())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(expected)
