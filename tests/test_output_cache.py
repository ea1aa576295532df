"""The CPU kernels' cache of freed output buffers (csrc/cpu/output_cache.cpp, fpn_kernels.memory):
reuse is exact (a reused block full of garbage still gives eager's output), bounded by the limit,
visible to the profiler, and outputs behave like any CPU tensor."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch
from conftest import assert_close, make_inputs

import fpn_kernels
from fpn_kernels.reference import upsample_add_conv1x1_reference as reference

pytestmark = pytest.mark.skipif("cpu" not in fpn_kernels.available_backends(),
                                reason="C++ extension absent")

MIB = 1 << 20
# (2, 64, 64, 96) float32 = 3 MiB: above the cache's 1 MiB threshold, two 2 MiB blocks.
BIG = dict(n=2, c_in=16, c_out=64, out_hw=(64, 96), top_hw=(32, 48))
BIG_BLOCK = 4 * MIB  # float32; the cache rounds a block up to 2 MiB


def block_bytes(t: torch.Tensor) -> int:
    return -(-t.untyped_storage().nbytes() // (2 * MIB)) * 2 * MIB


@pytest.fixture
def cache():
    """A clean cache with a known limit; restores the old limit afterwards."""
    old = fpn_kernels.set_cpu_output_cache_limit(64 * MIB)
    fpn_kernels.empty_cpu_output_cache()
    yield
    fpn_kernels.set_cpu_output_cache_limit(old)


def fused(*inputs, **kwargs):
    return fpn_kernels.upsample_add_conv1x1(*inputs, backend="cpu", **kwargs)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reused_block_full_of_garbage_gives_eager_output(cache, channels_last, dtype):
    inputs = make_inputs(**BIG, dtype=dtype, channels_last=channels_last)
    first = fused(*inputs)
    first_ptr, block = first.data_ptr(), block_bytes(first)
    first.fill_(float("nan"))  # what the next output's memory will hold
    del first
    before = fpn_kernels.cpu_output_cache_info()
    assert before.cached_blocks == 1 and before.cached_bytes == block

    second = fused(*inputs)
    after = fpn_kernels.cpu_output_cache_info()
    assert second.data_ptr() == first_ptr, "the freed block was not reused"
    assert after.hits == before.hits + 1 and after.misses == before.misses
    assert after.cached_blocks == 0 and after.live_bytes >= block
    assert_close(second, reference(*inputs), msg="output in a reused block")


def test_backward_grad_lateral_reuses_blocks_exactly(cache):
    inputs = make_inputs(n=2, c_in=64, c_out=16, out_hw=(64, 96), top_hw=(32, 48),
                         requires_grad=True)
    grad_out = torch.randn(2, 16, 64, 96)
    expected = torch.autograd.grad(reference(*inputs), [inputs[0]], grad_out)[0]
    for _ in range(3):  # the 2nd and 3rd grad_lateral land in the 1st one's freed block
        (grad_lateral,) = torch.autograd.grad(fused(*inputs), [inputs[0]], grad_out)
        assert_close(grad_lateral, expected, scale=4, msg="grad_lateral")
        grad_lateral.fill_(float("nan"))
        del grad_lateral
    assert fpn_kernels.cpu_output_cache_info().hits >= 2


def test_limit_bounds_what_is_kept(cache):
    fpn_kernels.set_cpu_output_cache_limit(2 * BIG_BLOCK)
    outputs = [fused(*make_inputs(**BIG, seed=i)) for i in range(4)]
    assert fpn_kernels.cpu_output_cache_info().live_bytes >= 4 * BIG_BLOCK
    del outputs
    info = fpn_kernels.cpu_output_cache_info()
    assert info.cached_bytes == 2 * BIG_BLOCK and info.cached_blocks == 2

    assert fpn_kernels.set_cpu_output_cache_limit(BIG_BLOCK) == 2 * BIG_BLOCK
    assert fpn_kernels.cpu_output_cache_info().cached_bytes == BIG_BLOCK  # trimmed at once
    fpn_kernels.set_cpu_output_cache_limit(0)
    out = fused(*make_inputs(**BIG))
    del out
    assert fpn_kernels.cpu_output_cache_info().cached_bytes == 0, "limit 0 keeps nothing"


def test_small_outputs_bypass_the_cache(cache):
    before = fpn_kernels.cpu_output_cache_info()
    out = fused(*make_inputs())  # 2 x 7 x 10 x 19 floats: far below 1 MiB
    del out
    after = fpn_kernels.cpu_output_cache_info()
    assert (after.hits, after.misses, after.cached_bytes) == (before.hits, before.misses, 0)


def test_outputs_behave_like_cpu_tensors(cache):
    inputs = make_inputs(**BIG)
    out = fused(*inputs)
    expected = reference(*inputs)
    assert out.untyped_storage().resizable()
    out.resize_(4, 64, 64, 96)  # grows through the cache's allocator, keeping the data
    assert_close(out[:2], expected, msg="data kept across resize_")
    view = fused(*inputs)[1]  # a view keeps its block alive after the base name is gone
    fpn_kernels.empty_cpu_output_cache()
    torch.empty(8 * MIB).fill_(1.0)
    assert_close(view, expected[1], msg="view of a live output")


def test_release_from_other_threads(cache):
    inputs = make_inputs(**BIG)
    expected = reference(*inputs)
    outputs = [fused(*inputs) for _ in range(8)]
    errors = []

    def drop(chunk):
        try:
            for out in chunk:
                assert_close(out, expected, msg="output read in another thread")
            chunk.clear()
        except Exception as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=drop, args=(outputs[i::4],)) for i in range(4)]
    del outputs
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert fpn_kernels.cpu_output_cache_info().cached_blocks == 8


def test_profiler_sees_the_output_allocation_on_a_hit(cache):
    inputs = make_inputs(**BIG)
    out_bytes = 2 * 64 * 64 * 96 * 4
    del_me = fused(*inputs)
    del del_me  # the next call is a hit
    with torch.no_grad(), torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fused(*inputs)
        del out
    usage = [e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage != 0]
    assert out_bytes in usage and -out_bytes in usage, usage


def test_limit_argument_is_validated():
    with pytest.raises(TypeError, match=r"limit_bytes: expected an int, got float"):
        fpn_kernels.set_cpu_output_cache_limit(1.5)
    with pytest.raises(TypeError, match=r"limit_bytes: expected an int, got bool"):
        fpn_kernels.set_cpu_output_cache_limit(True)
    with pytest.raises(ValueError, match=r"limit_bytes: expected >= 0, got -1"):
        fpn_kernels.set_cpu_output_cache_limit(-1)


ENV_BAD = "ValueError: FPN_KERNELS_CPU_OUTPUT_CACHE_MB: expected a non-negative integer"


@pytest.mark.parametrize("value, expected", [("7", "limit 7340032"), ("0", "limit 0"),
                                             ("lots", ENV_BAD), ("-3", ENV_BAD)])
def test_limit_from_the_environment(value, expected):
    script = (
        "import torch, fpn_kernels\n"
        "try:\n"
        "    fpn_kernels.upsample_add_conv1x1(*[torch.ones(s) for s in "
        "((1, 1, 2, 2), (1, 1), (1,), (1, 1, 1, 1))], backend='cpu')\n"
        "    print('limit', fpn_kernels.cpu_output_cache_info().limit_bytes)\n"
        "except ValueError as exc:\n"
        "    print('ValueError:', exc)\n")
    env = dict(os.environ, FPN_KERNELS_CPU_OUTPUT_CACHE_MB=value)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert expected in result.stdout, result.stdout + result.stderr
