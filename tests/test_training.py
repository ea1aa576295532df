"""Training at scale: a converted model under DistributedDataParallel (gloo, 2 processes) and
under activation checkpointing gives the unconverted model's loss and gradients."""

from __future__ import annotations

import copy
import os
import time
from collections import OrderedDict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.checkpoint import checkpoint
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.misc import FrozenBatchNorm2d

import fpn_kernels
from fpn_kernels.modules import FusedFPN

WORLD_SIZE = 2
TIMEOUT_S = 240
# fp32 gradients are sums over every pixel: the fused GEMM adds in another order than ATen's conv
GRAD_TOL = dict(atol=1e-4, rtol=1e-4)
LOSS_TOL = dict(atol=1e-5, rtol=1e-5)


class Detector(nn.Module):
    """A small backbone (stride-2 stages C2..C5) + torchvision's FPN + a loss on every level."""

    def __init__(self, use_checkpoint: bool = False, norm_layer=None):
        super().__init__()
        channels = [3, 8, 12, 16, 20]
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU())
            for c_in, c_out in zip(channels[:-1], channels[1:], strict=True)
        )
        self.fpn = FeaturePyramidNetwork(channels[1:], 8, LastLevelMaxPool(), norm_layer)
        with torch.no_grad():
            for name, p in self.fpn.named_parameters():
                if name.endswith("bias"):
                    p.uniform_(-0.5, 0.5)  # torchvision zeroes them: make a dropped bias show
        self.use_checkpoint = use_checkpoint

    def forward(self, images):
        features = OrderedDict()
        x = images
        for i, stage in enumerate(self.stages):
            x = stage(x)
            features[f"c{i + 2}"] = x
        if self.use_checkpoint:
            out = checkpoint(self.fpn, features, use_reentrant=False)
        else:
            out = self.fpn(features)
        return sum((v.square().mean() * (i + 1)) for i, v in enumerate(out.values()))


def make_pair(use_checkpoint=False, norm_layer=None):
    torch.manual_seed(0)
    model = Detector(use_checkpoint, norm_layer)
    converted = fpn_kernels.convert(copy.deepcopy(model))
    assert type(converted.fpn) is FusedFPN
    return model, converted


def batch(rank, step, n=2, hw=(67, 91)):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(n, 3, *hw, generator=g)


def train_steps(model, rank, steps=2):
    """A few SGD steps; the losses, and the gradients of the last one, by parameter name."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for step in range(steps):
        optimizer.zero_grad()
        loss = model(batch(rank, step))
        loss.backward()
        losses.append(loss.detach())
        if step < steps - 1:
            optimizer.step()
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    return torch.stack(losses), grads


def assert_same_training(want, got):
    want_losses, want_grads = want
    got_losses, got_grads = got
    torch.testing.assert_close(got_losses, want_losses, **LOSS_TOL)
    assert set(got_grads) == set(want_grads)
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], **GRAD_TOL, msg=name)


def _ddp_worker(rank, init_file, out_dir, use_checkpoint):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE)
    try:
        model, converted = make_pair(use_checkpoint)
        results = {}
        for name, m in (("eager", model), ("fused", converted)):
            ddp = nn.parallel.DistributedDataParallel(m)
            results[name] = train_steps(ddp, rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ddp(tmp_path, use_checkpoint):
    context = mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), use_checkpoint),
                       nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"DDP workers did not finish in {TIMEOUT_S} s")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("use_checkpoint", [False, True], ids=["ddp", "ddp_checkpoint"])
def test_ddp_converted_model_trains_like_the_unconverted_one(tmp_path, use_checkpoint):
    ranks = run_ddp(tmp_path, use_checkpoint)
    for rank, results in enumerate(ranks):
        assert_same_training(results["eager"], results["fused"])
        # DDP averaged the gradients: every rank holds the same ones, for both models.
        for name in ("eager", "fused"):
            for p, g in ranks[0][name][1].items():
                assert torch.equal(results[name][1][p], g), (rank, name, p)
    # the ranks saw different data
    assert not torch.equal(ranks[0]["eager"][0], ranks[1]["eager"][0])


@pytest.mark.parametrize("norm", [None, FrozenBatchNorm2d], ids=["no_norm", "frozen_bn"])
def test_activation_checkpointing_matches_the_unconverted_model(norm):
    """checkpoint(fpn, use_reentrant=False) recomputes the fused forward in the backward: same
    loss and gradients as the unconverted model, with and without checkpointing."""
    model, converted = make_pair(use_checkpoint=True, norm_layer=norm)
    plain = copy.deepcopy(model)
    plain.use_checkpoint = False
    want = train_steps(plain, rank=0)
    assert_same_training(want, train_steps(model, rank=0))
    assert_same_training(want, train_steps(converted, rank=0))


def test_autocast_bfloat16_training_matches_the_unconverted_model():
    """torch.autocast(cpu, bfloat16), as Intel's guide runs CPU training: the fused merges cast
    like eager's conv2d, so loss and gradients agree at bf16 tolerance."""
    model, converted = make_pair()
    results = []
    for m in (model, converted):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = m(batch(0, 0))
        loss.backward()
        results.append((loss.detach().float(),
                        {n: p.grad.clone() for n, p in m.named_parameters()}))
    (want_loss, want_grads), (got_loss, got_grads) = results
    torch.testing.assert_close(got_loss, want_loss, atol=2e-2, rtol=2e-2)
    for name, g in want_grads.items():
        scale = g.abs().max().item()
        torch.testing.assert_close(got_grads[name], g, atol=3e-2 * scale, rtol=3e-2, msg=name)
