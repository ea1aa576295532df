"""Shared test helpers: input factory and per-dtype tolerances (eager PyTorch is the oracle)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fpn_kernels
from fpn_kernels.cli.check import TOLERANCES as CHECK_TOLERANCES


def run_pytest_under_interpreter(target: str, *pytest_args: str,
                                 timeout: int = 900) -> subprocess.CompletedProcess:
    """``target`` (a test file, or file::test) in a fresh ``python -m pytest`` with
    TRITON_INTERPRET=1, which must be set before triton is imported (too late in this process).
    Fails with the run's output unless it exits 0; returns the run for the caller's checks."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, target],
        cwd=Path(__file__).resolve().parents[1], env=dict(os.environ, TRITON_INTERPRET="1"),
        capture_output=True, text=True, timeout=timeout,
    )
    assert run.returncode == 0, f"interpreter run failed:\n{run.stdout[-8000:]}\n{run.stderr}"
    return run


# (atol, rtol) per dtype for unit-scale data: the same table `python -m fpn_kernels check` uses.
TOLERANCES = {
    dtype: CHECK_TOLERANCES[str(dtype).removeprefix("torch.")]
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 scale: float = 1.0, msg: str = "") -> None:
    """Per-dtype comparison; `scale` widens atol for sums of many terms (gradients)."""
    atol, rtol = TOLERANCES[dtype or expected.dtype]
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{msg}: shape {actual.shape} != {expected.shape}"
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol, msg=msg or None)


@contextlib.contextmanager
def torch_switch(owner, name: str, value):
    """``owner.name = value`` for the block, then the previous value again: torch's global
    switches (``torch.backends.cudnn.allow_tf32``, ``torch.backends.mkldnn.enabled``)."""
    previous = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, previous)


def make_inputs(n=2, c_in=5, c_out=7, out_hw=(10, 19), top_hw=(5, 10), *, dtype=torch.float32,
                channels_last=False, bias=True, requires_grad=False, seed=0, device="cpu"):
    """lateral (N, C_in, H, W), weight (C_out, C_in, 1, 1), bias (C_out,) or None, top."""
    g = torch.Generator().manual_seed(seed)
    lateral = torch.randn(n, c_in, *out_hw, generator=g)
    weight = torch.randn(c_out, c_in, 1, 1, generator=g) / max(c_in, 1) ** 0.5
    b = torch.randn(c_out, generator=g) if bias else None
    top = torch.randn(n, c_out, *top_hw, generator=g)
    tensors = [t.to(device=device, dtype=dtype) if t is not None else None
               for t in (lateral, weight, b, top)]
    if channels_last:
        tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
        tensors[3] = tensors[3].contiguous(memory_format=torch.channels_last)
    if requires_grad:
        for t in tensors:
            if t is not None:
                t.requires_grad_(True)
    return tuple(tensors)


def fused_backends(device: str = "cpu") -> list[str]:
    """Available non-reference backends that run on `device` (plus eager, to test the op path)."""
    names = []
    for name in fpn_kernels.available_backends():
        b = fpn_kernels.backends.BACKENDS[name]
        if device in b.supported_devices(auto=False):
            names.append(name)
    return names


@pytest.fixture(params=fused_backends("cpu"))
def cpu_backend(request) -> str:
    return request.param
