"""No memory growth: 1,000 forward + backward calls on small tensors leave the process's resident
memory and its count of Python objects where a warm-up left them (within a small slack)."""

from __future__ import annotations

import gc
import os

import pytest
import torch
from _differential import forward_backward, op
from conftest import fused_backends, make_inputs

CALLS, WARMUP = 1000, 100
# Each call's output is 2 * 16 * 16 * 32 float32 = 64 KiB, so keeping one output-sized buffer per
# call would grow the process by >= 62 MiB; allocator and page-cache noise stay far below this.
RSS_SLACK = 16 << 20
OBJECT_SLACK = 200  # one leaked Python object per call would be 1,000

# Layouts, modes, scale factors, bias or not: every path of a backend's forward and backward.
CALL_KINDS = [
    dict(kwargs={}, channels_last=False, bias=True),
    dict(kwargs=dict(mode="nearest-exact"), channels_last=True, bias=False),
    dict(kwargs=dict(scale_factor=2.0), channels_last=False, bias=True),
    dict(kwargs=dict(scale_factor=(2.0, 2.05)), channels_last=True, bias=True),
]


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def one_thread():
    """Leaks do not depend on threads; one intra-op thread keeps 2,200 small calls quick on a
    busy machine (idle OpenMP workers there can add ~10 ms to a call)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux /proc")
@pytest.mark.parametrize("backend", fused_backends("cpu"))
def test_repeated_calls_do_not_grow_memory(one_thread, backend):
    def one_call(i):
        kind = CALL_KINDS[i % len(CALL_KINDS)]
        # top (8, 16) -> (16, 32) by size, by 2.0 and by (2.0, 2.05) (floor(16 * 2.05) = 32).
        inputs = make_inputs(2, 8, 16, (16, 32), (8, 16), channels_last=kind["channels_last"],
                             bias=kind["bias"], requires_grad=True, seed=i % 7)
        grad_out = torch.ones(2, 16, 16, 32)
        forward_backward(op(backend), inputs, grad_out, **kind["kwargs"])

    for i in range(WARMUP):
        one_call(i)
    gc.collect()
    rss, objects = resident_bytes(), len(gc.get_objects())
    for i in range(CALLS):
        one_call(i)
    gc.collect()
    grown, new_objects = resident_bytes() - rss, len(gc.get_objects()) - objects
    assert grown <= RSS_SLACK, f"{backend}: RSS grew {grown / 2**20:.1f} MiB over {CALLS} calls"
    assert new_objects <= OBJECT_SLACK, f"{backend}: {new_objects} more Python objects"
