"""The Triton backend on a CUDA GPU (``pytest -m gpu``; skipped without one).

The interpreter matrix (tests/triton_cases.py) on CUDA tensors, then what only a GPU shows: the
real ResNet-50-FPN level sizes through the autotuned configs, bitwise-deterministic gradients,
int64 offsets (forced, and a real image of more than 2^31 elements), torch.compile with the op
as one node. fp32 following ``torch.backends.cudnn.allow_tf32`` like eager conv2d is checked
for both GPU backends in tests/test_cuda_backend.py.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import assert_close, make_inputs, torch_switch
from triton_cases import CASES, DTYPES, Case, run_case

from fpn_kernels import backends, upsample_add_conv1x1, upsample_add_conv1x1_reference
from fpn_kernels.reference import upsample_add_conv1x1_reference_backward

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# ResNet-50-FPN at 800x1216, N=2: (C_in, lateral HxW, top hxw).
FPN_LEVELS = {
    "P4": Case(2, 1024, 256, (50, 76), (25, 38)),
    "P3": Case(2, 512, 256, (100, 152), (50, 76)),
    "P2": Case(2, 256, 256, (200, 304), (100, 152)),
}


def cudnn_tf32(allowed: bool):
    return torch_switch(torch.backends.cudnn, "allow_tf32", allowed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.fixture(autouse=True)
def ieee_fp32():
    """fp32 as IEEE on both sides unless a test says otherwise: tight fp32 tolerances hold."""
    with cudnn_tf32(False):
        yield


def test_auto_picks_triton_for_cuda_tensors():
    assert backends.BACKENDS["triton"].unavailable_reason is None
    assert backends.select_backend("auto", torch.device("cuda"), torch.float16) == "triton"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_eager(case, dtype, channels_last):
    run_case(case, dtype, channels_last, device="cuda")


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("level", list(FPN_LEVELS), ids=str)
def test_resnet50_fpn_levels(level, dtype, channels_last):
    run_case(FPN_LEVELS[level], dtype, channels_last, device="cuda")


# fp32 following cudnn.allow_tf32: tests/test_cuda_backend.py checks both GPU backends.


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_bits_every_run(dtype, channels_last, deterministic):
    case = FPN_LEVELS["P3"]
    lateral, weight, bias, top = make_inputs(case.n, case.c_in, case.c_out, case.out_hw,
                                             case.top_hw, dtype=dtype,
                                             channels_last=channels_last, requires_grad=True,
                                             device="cuda")
    grad_out = torch.randn(case.n, case.c_out, *case.out_hw, device="cuda", dtype=dtype)
    runs = []
    with deterministic_algorithms(deterministic):
        for _ in range(3):
            out = upsample_add_conv1x1(lateral, weight, bias, top, backend="triton")
            runs.append((out, *torch.autograd.grad(out, [lateral, weight, bias, top], grad_out)))
    for first, later in zip(runs[0], runs[1], strict=True):
        assert torch.equal(first, later)
    for first, later in zip(runs[0], runs[2], strict=True):
        assert torch.equal(first, later)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_int64_offsets_forced(monkeypatch, dtype, channels_last):
    from fpn_kernels.triton import launch

    monkeypatch.setattr(launch, "INT64_INDEX_FROM", 1)
    run_case(CASES[0], dtype, channels_last, device="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_image_of_more_than_2_31_elements(channels_last):
    # out: 1 x 128 x 4096 x 4100 fp32 = 2.15e9 elements (8.6 GB); eager needs four of those.
    free, _ = torch.cuda.mem_get_info()
    if free < 60e9:
        pytest.skip(f"needs 60 GB of free GPU memory, {free / 1e9:.0f} GB free")
    n, c_in, c_out, out_hw, top_hw = 1, 8, 128, (4096, 4100), (2048, 2050)
    pixels = out_hw[0] * out_hw[1]
    assert c_out * pixels >= 2**31
    lateral, weight, bias, top = make_inputs(n, c_in, c_out, out_hw, top_hw,
                                             channels_last=channels_last, device="cuda")
    with torch.no_grad():
        out = upsample_add_conv1x1(lateral, weight, bias, top, backend="triton")
        expected = upsample_add_conv1x1_reference(lateral, weight, bias, top)
        # The last channels lie past element 2^31: compare them, and the first ones.
        for channels in (slice(0, 2), slice(c_out - 2, c_out)):
            assert_close(out[:, channels], expected[:, channels], msg=f"channels {channels}")
    del expected
    grad_out = torch.ones_like(out)
    from fpn_kernels.triton import launch

    _, grad_weight, grad_bias, grad_top = launch.backward(
        grad_out, lateral, weight.reshape(c_out, c_in), list(top_hw), "nearest", None,
        channels_last, "cuda", [False, True, True, True])
    # With grad_out = 1: grad_bias = pixels, grad_weight = lateral's per-channel sums, and each
    # top pixel of an exact 2x upsample feeds 4 output pixels.
    assert_close(grad_bias, torch.full_like(grad_bias, pixels), scale=math.sqrt(pixels))
    want = lateral.sum(dim=(0, 2, 3)).expand(c_out, c_in)
    assert_close(grad_weight, want, scale=math.sqrt(pixels))
    assert torch.all(grad_top == 4)


def test_inductor_compiles_the_kernels(tmp_path):
    """Under torch.compile the AOTDispatcher decomposes the op into our kernels (fpn_kernels/
    triton/graph.py: tests/test_triton_graph.py checks the graphs on CPU); Inductor compiles
    them as user-defined kernels, forward and backward, and AOTInductor packages them."""
    case = CASES[0]
    lateral, weight, bias, top = make_inputs(case.n, case.c_in, case.c_out, case.out_hw,
                                             case.top_hw, dtype=torch.float16, device="cuda",
                                             requires_grad=True)

    def merge(lateral, weight, bias, top):
        return upsample_add_conv1x1(lateral, weight, bias, top, backend="triton")

    torch._dynamo.reset()
    eager = merge(lateral, weight, bias, top)
    grads = torch.autograd.grad(eager.sum(), (lateral, weight, bias, top))
    compiled = torch.compile(merge, fullgraph=True)
    out = compiled(lateral, weight, bias, top)
    assert_close(out, eager)
    for got, want in zip(torch.autograd.grad(out.sum(), (lateral, weight, bias, top)), grads,
                         strict=True):
        assert_close(got, want, scale=math.sqrt(case.n * math.prod(case.out_hw)))

    class Merge(torch.nn.Module):
        def forward(self, lateral, top):
            return merge(lateral, weight.detach(), bias.detach(), top)

    inputs = (lateral.detach(), top.detach())
    with torch.no_grad():
        ep = torch.export.export(Merge(), inputs)
    path = torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp_path / "m.pt2"))
    with torch.no_grad():
        assert_close(torch._inductor.aoti_load_package(path)(*inputs), eager.detach())


def test_torch_compile_one_node():
    case = CASES[0]
    lateral, weight, bias, top = make_inputs(case.n, case.c_in, case.c_out, case.out_hw,
                                             case.top_hw, dtype=torch.float16, device="cuda")

    def merge(lateral, weight, bias, top):
        return upsample_add_conv1x1(lateral, weight, bias, top, backend="triton")

    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch.compile(merge, backend=record, fullgraph=True)(lateral, weight, bias, top)
    ops = [node.target for gm in graphs for node in gm.graph.nodes
           if isinstance(node.target, torch._ops.OpOverload)]
    assert ops == [torch.ops.fpn_kernels.upsample_add_conv1x1.default]
    compiled = torch.compile(merge, fullgraph=True)  # inductor, which compiles the kernels
    assert_close(compiled(lateral, weight, bias, top),
                 upsample_add_conv1x1_reference(lateral, weight, bias, top))


def test_backward_matches_reference_needs_subsets():
    case = FPN_LEVELS["P4"]
    lateral, weight, _, _ = make_inputs(case.n, case.c_in, case.c_out, case.out_hw, case.top_hw,
                                        dtype=torch.float16, device="cuda")
    weight = weight.reshape(case.c_out, case.c_in)
    grad_out = torch.randn(case.n, case.c_out, *case.out_hw, device="cuda", dtype=torch.float16)
    from fpn_kernels.triton import launch

    expected = upsample_add_conv1x1_reference_backward(grad_out, lateral, weight, case.top_hw)
    terms = [case.c_out] + [case.n * case.out_hw[0] * case.out_hw[1]] * 2 + [4]
    for index in range(4):
        needs = [i == index for i in range(4)]
        grads = launch.backward(grad_out, lateral, weight, list(case.top_hw), "nearest", None,
                                False, "cuda", needs)
        assert [g is not None for g in grads] == needs
        assert_close(grads[index], expected[index], scale=math.sqrt(terms[index]))
