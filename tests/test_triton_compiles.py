"""How often the Triton backend compiles and tunes when image sizes vary (multi-scale training,
variable-size evaluation), counted on this GPU-less machine with triton's own JIT cache key.

Each launch the backend makes is recorded instead of run, and triton's binder for sm_90 (the
code ``JITFunction.run`` uses to look a kernel up in its cache) turns its arguments into the
specialization that decides whether a launch compiles. Over 20 image sizes a kernel compiles
once per pixel alignment (PIXEL_ALIGN, a constexpr) and config the shape rule picks, never per
size; nothing is ever timed; and no launch for CUDA's index math builds a device index table
(the per-call host-to-device copy that broke CUDA-graph capture).
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("counts the compiled JIT's cache keys; the interpreter has none",
                allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from fpn_kernels import indexing  # noqa: E402
from fpn_kernels.triton import launch  # noqa: E402

# 20 training scales (short side 480..800, aspect 1333:800) at FPN level P3 (stride 8; top is
# P4, stride 16), rounded up like a backbone's strided convolutions.
IMAGE_SIZES = [(s, s * 1333 // 800) for s in range(480, 801, 16)][:20]


def _levels():
    for height, width in IMAGE_SIZES:
        out_hw = (-(-height // 8), -(-width // 8))
        top_hw = (-(-height // 16), -(-width // 16))
        yield out_hw, top_hw


class Recorder:
    """Stands in for launch._launch: records triton's JIT cache key of each launch."""

    def __init__(self):
        self.backend = make_backend(GPUTarget("cuda", 90, 32))
        self.binders = {}
        self.keys: Counter = Counter()
        self.aligns: dict[str, set] = {}

    def __call__(self, kernel, grid, args, flags, config):
        binder = self.binders.get(kernel.fn.__name__)
        if binder is None:
            binder = self.binders[kernel.fn.__name__] = create_function_from_signature(
                kernel.signature, kernel.params, self.backend)
        _, specialization, options = binder(*args, **flags, **config.all_kwargs())
        key = (kernel.fn.__name__, str(specialization), str(sorted(options.items())))
        self.keys[key] += 1
        self.aligns.setdefault(kernel.fn.__name__, set()).add(
            (flags.get("PIXEL_ALIGN"), str(config)))


@pytest.fixture
def recorder(monkeypatch):
    def no_timing(*args, **kwargs):
        raise AssertionError("a launch benchmarked configs (autotuning)")

    monkeypatch.setattr(triton.testing, "do_bench", no_timing)
    rec = Recorder()
    monkeypatch.setattr(launch, "_launch", rec)
    return rec


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_twenty_image_sizes_compile_per_alignment_not_per_size(recorder, channels_last):
    n, c_in, c_out = 2, 512, 256
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    weight = torch.empty(c_out, c_in, dtype=torch.float16)
    bias = torch.empty(c_out, dtype=torch.float16)
    tables_before = len(indexing._device_tables)
    for out_hw, top_hw in _levels():
        lateral = torch.empty(n, c_in, *out_hw, dtype=torch.float16).contiguous(memory_format=fmt)
        top = torch.empty(n, c_out, *top_hw, dtype=torch.float16).contiguous(memory_format=fmt)
        grad_out = torch.empty(n, c_out, *out_hw, dtype=torch.float16)
        grad_out = grad_out.contiguous(memory_format=fmt)
        launch.forward(lateral, weight, bias, top, "nearest", None, channels_last, "cuda")
        launch.backward(grad_out, lateral, weight, list(top_hw), "nearest", None, channels_last,
                        "cuda", [True] * 4)
    assert len(indexing._device_tables) == tables_before, "a launch built a device index table"
    kernels = Counter(name for name, _, _ in recorder.keys)
    # forward and grad_lateral both run upsample_add_conv1x1_kernel (different constexprs).
    assert sum(recorder.keys.values()) == 20 * 5
    for name, compiles in kernels.items():
        distinct = len(recorder.aligns[name]) * (2 if name == "upsample_add_conv1x1_kernel"
                                                 else 1)
        assert compiles <= distinct, (
            f"{name}: {compiles} compiles over 20 sizes, but only {distinct} (alignment, "
            f"config) pairs: something size-dependent is specialized")
    # NCHW: PIXEL_ALIGN takes 4 values over these sizes (NHWC: 1), each compiled once per use.
    expected_aligns = 1 if channels_last else 4
    assert len({a for a, _ in recorder.aligns["upsample_add_conv1x1_kernel"]}) == expected_aligns
    assert kernels["nearest_upsample_grad_kernel"] == 1 and kernels["ordered_sum_kernel"] == 1
    assert kernels["upsample_add_conv1x1_kernel"] < 20, dict(kernels)
    # ...and a second epoch over the same sizes compiles nothing new.
    before = set(recorder.keys)
    for out_hw, top_hw in _levels():
        lateral = torch.empty(n, c_in, *out_hw, dtype=torch.float16).contiguous(memory_format=fmt)
        top = torch.empty(n, c_out, *top_hw, dtype=torch.float16).contiguous(memory_format=fmt)
        launch.forward(lateral, weight, bias, top, "nearest", None, channels_last, "cuda")
    assert set(recorder.keys) == before


def test_sizes_are_not_specialized(recorder):
    # Two sizes with the same pixel alignment and config: one cache key per kernel.
    weight = torch.empty(256, 256, dtype=torch.float16)
    for out_hw, top_hw in (((100, 152), (50, 76)), ((104, 160), (52, 80))):
        lateral = torch.empty(2, 256, *out_hw, dtype=torch.float16)
        top = torch.empty(2, 256, *top_hw, dtype=torch.float16)
        launch.forward(lateral, weight, None, top, "nearest", None, False, "cuda")
        launch.backward(torch.empty(2, 256, *out_hw, dtype=torch.float16), lateral, weight,
                        list(top_hw), "nearest", None, False, "cuda", [False, True, True, True])
    assert all(count == 2 for count in recorder.keys.values()), recorder.keys


def test_any_batch_size_fits_the_grids(monkeypatch):
    # CUDA limits grid axes 1 and 2 to 65535 and axis 0 to 2^31 - 1: the batch (and the
    # grad_weight splits, N per pixel chunk) is on axis 0 of every launch, so N = 70000 fits.
    grids = []
    monkeypatch.setattr(launch, "_launch", lambda kernel, grid, args, flags, config:
                        grids.append((kernel.fn.__name__, tuple(grid))))
    n = 70000
    lateral = torch.empty(n, 16, 2, 3, dtype=torch.float16)
    weight, bias = torch.empty(8, 16, dtype=torch.float16), torch.empty(8, dtype=torch.float16)
    top = torch.empty(n, 8, 1, 2, dtype=torch.float16)
    launch.forward(lateral, weight, bias, top, "nearest", None, False, "cuda")
    launch.backward(torch.empty(n, 8, 2, 3, dtype=torch.float16), lateral, weight, [1, 2],
                    "nearest", None, False, "cuda", [True] * 4)
    assert len(grids) == 5
    for name, grid in grids:
        assert len(grid) <= 3 and grid[0] < 2**31 and all(g <= 65535 for g in grid[1:]), (
            name, grid)
        if name != "ordered_sum_kernel":  # the one launch over the (C_out, C_in) sums only
            assert grid[0] >= n, (name, grid)
