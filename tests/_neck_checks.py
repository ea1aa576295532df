"""Checks shared by the framework tests (test_mmdet.py, test_detectron2.py): a converted neck
against the framework's own, after the same forward and backward."""

from __future__ import annotations

import torch
from conftest import assert_close
from torch import nn


def loss(outputs) -> torch.Tensor:
    """A weighted sum of every output (fixed random weights), so that each output element gets
    its own gradient."""
    gen = torch.Generator().manual_seed(1)
    return sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in outputs)


def assert_same_grad(actual: torch.Tensor, expected: torch.Tensor, scale: float, msg: str):
    """Both None (the tensor took no part), or close."""
    if expected.grad is None:
        assert actual.grad is None, f"{msg}: {actual.grad} where the reference has None"
    else:
        assert_close(actual.grad, expected.grad, scale=scale, msg=msg)


def assert_same_state(reference: nn.Module, fused: nn.Module, grad_scale: float) -> None:
    """The same parameters (names and gradients) and floating-point buffers (running
    statistics move the same way in training mode)."""
    fused_params = dict(fused.named_parameters())
    assert list(fused_params) == [n for n, _ in reference.named_parameters()]
    for name, p in reference.named_parameters():
        assert_same_grad(fused_params[name], p, grad_scale, f"grad of {name}")
    fused_state = fused.state_dict()
    assert list(fused_state) == list(reference.state_dict())
    for name, t in reference.state_dict().items():
        if t.is_floating_point():
            assert_close(fused_state[name], t, msg=name)
