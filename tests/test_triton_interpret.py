"""The Triton kernels, run by Triton's interpreter on CPU tensors, against eager.

TRITON_INTERPRET=1 must be set before triton is imported, and by the time this file is
collected in a plain ``pytest tests`` run, torch (and maybe triton) are imported. So the plain
run has one test, which runs this same file again in a fresh ``python -m pytest`` with
TRITON_INTERPRET=1; there the real matrix below is collected. Run the matrix directly with
``TRITON_INTERPRET=1 pytest tests/test_triton_interpret.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import run_pytest_under_interpreter

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

if not INTERPRETING:

    def test_interpreter_matrix_in_a_fresh_process():
        pytest.importorskip("triton")
        run = run_pytest_under_interpreter(str(Path(__file__).resolve()))
        assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout[-2000:]

    def test_unavailable_reason_without_gpu_says_how_to_test():
        pytest.importorskip("triton")
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is present: the backend is available")
        from fpn_kernels import triton as triton_backend

        reason = triton_backend.unavailable_reason()
        assert reason is not None and "TRITON_INTERPRET=1" in reason

else:
    import math

    from conftest import assert_close, make_inputs
    from triton_cases import CASES, DTYPES, Case, run_case

    import fpn_kernels
    from fpn_kernels import backends
    from fpn_kernels.reference import upsample_add_conv1x1_reference_backward
    from fpn_kernels.triton import launch

    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_eager(case, dtype, channels_last):
        run_case(case, dtype, channels_last, device="cpu")

    def test_backend_is_available_for_cpu_tensors_by_name_only():
        assert backends.BACKENDS["triton"].unavailable_reason is None
        assert "triton" in fpn_kernels.available_backends()
        # "auto" never picks the interpreter for CPU tensors: it is a correctness tool.
        assert backends.select_backend("auto", torch.device("cpu"), torch.float32) != "triton"

    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
    def test_int64_offsets(monkeypatch, channels_last):
        # Images of 2^31 elements do not fit this machine; lowering the threshold runs the
        # same int64 code path on small tensors.
        monkeypatch.setattr(launch, "INT64_INDEX_FROM", 1)
        run_case(Case(2, 17, 33, (19, 10), (10, 5), scale_factor=(1.9, 2.0)), torch.float32,
                 channels_last, device="cpu")

    @pytest.mark.parametrize("deterministic", [False, True])
    def test_backward_same_bits_every_run(deterministic):
        case = CASES[4]
        g = torch.Generator().manual_seed(3)
        lateral = torch.randn(case.n, case.c_in, *case.out_hw, generator=g)
        weight = torch.randn(case.c_out, case.c_in, generator=g)
        grad_out = torch.randn(case.n, case.c_out, *case.out_hw, generator=g)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(deterministic)
        try:
            runs = [launch.backward(grad_out, lateral, weight, list(case.top_hw), case.mode,
                                    None, False, "cpu_generic", [True] * 4) for _ in range(2)]
        finally:
            torch.use_deterministic_algorithms(previous)
        for first, second in zip(*runs, strict=True):
            assert torch.equal(first, second)

    # (in, out, scale_factor) per axis: 2x, odd ratios, shrinking, scale factors whose float32
    # products land next to an integer (where a double-precision shortcut would differ).
    CUDA_AXES = [(10, 19, None), (38, 75, None), (7, 7, None), (1, 5, None), (9, 5, None),
                 (6, 12, None), (10, 20, 2.05), (10, 61, 6.1), (7, 31, 4.5), (25, 50, None),
                 (3, 100, None), (100, 152, None)]

    @pytest.mark.parametrize("mode", ["nearest", "nearest-exact"])
    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
    def test_cuda_index_computed_in_the_kernel_is_bit_exact(mode, channels_last, monkeypatch):
        # index_kernel "cuda" (every CUDA tensor): the kernels compute ATen's CUDA source index
        # from float32 scales, with no table; it must equal fpn_kernels.indexing's "cuda"
        # tables bit for bit, forward (weight 0: out is the gathered top) and grad_top (small
        # integers: every window sum is exact).
        from fpn_kernels import indexing

        def no_tables(*args, **kwargs):
            raise AssertionError("a CUDA-formula launch built an index table")

        monkeypatch.setattr(launch, "index_table_tensor", no_tables)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        g = torch.Generator().manual_seed(0)
        for (h, out_h, sh), (w, out_w, sw) in zip(CUDA_AXES, CUDA_AXES[3:] + CUDA_AXES[:3],
                                                    strict=True):
            sf = None if sh is None or sw is None else [sh, sw]
            if sf is None:
                sh = sw = None
            c = 5
            top = torch.randn(1, c, h, w, generator=g).contiguous(memory_format=fmt)
            lateral = torch.randn(1, 3, out_h, out_w, generator=g).contiguous(memory_format=fmt)
            weight = torch.zeros(c, 3)
            rows = indexing.source_indices(h, out_h, sh, mode, "cuda")
            cols = indexing.source_indices(w, out_w, sw, mode, "cuda")
            out = launch.forward(lateral, weight, None, top, mode, sf, channels_last, "cuda")
            want = top[:, :, torch.from_numpy(rows.copy())][:, :, :, torch.from_numpy(cols.copy())]
            assert torch.equal(out, want), (h, out_h, w, out_w, sf, mode)

            grad_out = torch.randint(-4, 5, out.shape, generator=g).float()
            grad_out = grad_out.contiguous(memory_format=fmt)
            grad_top = launch.backward(grad_out, lateral, weight, [h, w], mode, sf,
                                       channels_last, "cuda", [False, False, False, True])[3]
            source = torch.from_numpy(rows[:, None] * w + cols[None, :]).reshape(-1)
            expected = torch.zeros(1, c, h * w).index_add_(2, source,
                                                           grad_out.reshape(1, c, -1))
            assert torch.equal(grad_top, expected.reshape(1, c, h, w)), (h, out_h, w, out_w)

    def test_ordered_sum_is_the_split_order_sum():
        # One launch reduces grad_weight and grad_bias; loads four rows at a time, adds them
        # in row order: bit-identical to the plain left-to-right fp32 sum, for every tail.
        g = torch.Generator().manual_seed(0)
        for splits in (1, 3, 4, 5, 9):
            partial = torch.randn(splits, 7 * 5 + 7, generator=g) * 1e3
            weight, bias = torch.empty(7, 5), torch.empty(7)
            launch._ordered_sum(partial, weight, bias)
            expected = partial[0].clone()
            for row in partial[1:]:
                expected += row
            assert torch.equal(weight.reshape(-1), expected[:35]), splits
            assert torch.equal(bias, expected[35:]), splits

    def test_weight_grad_split_is_fixed_by_shape():
        # CASES[0] sums several pixel chunks per image: the ordered partial sum is exercised.
        case = CASES[0]
        config = launch.kernels.CONV1X1_WEIGHT_GRAD_INTERPRET_CONFIG.kwargs
        tiles = (math.ceil(case.c_out / config["BLOCK_CO"])
                 * math.ceil(case.c_in / config["BLOCK_CI"]))
        pixels = case.out_hw[0] * case.out_hw[1]
        chunk, chunks = launch.weight_grad_split(case.n, pixels, tiles, config["BLOCK_K"])
        assert chunks > 1 and chunk % config["BLOCK_K"] == 0
        assert (chunks - 1) * chunk < pixels <= chunks * chunk

    @pytest.mark.parametrize("wanted", ["lateral", "weight", "bias", "top"])
    def test_one_gradient_at_a_time(wanted):
        # The backward computes only what `needs` asks for; the others come back as None.
        case = CASES[2]
        lateral, weight, _, top = make_inputs(case.n, case.c_in, case.c_out, case.out_hw,
                                              case.top_hw, seed=5)
        weight = weight.reshape(case.c_out, case.c_in)
        grad_out = torch.randn(case.n, case.c_out, *case.out_hw)
        index = ("lateral", "weight", "bias", "top").index(wanted)
        needs = [i == index for i in range(4)]
        grads = launch.backward(grad_out, lateral, weight, list(case.top_hw), case.mode, None,
                                False, "cpu_channels_last", needs)
        expected = upsample_add_conv1x1_reference_backward(grad_out, lateral, weight,
                                                           case.top_hw, case.mode)
        assert [g is not None for g in grads] == needs
        assert_close(grads[index], expected[index], msg=wanted,
                     scale=math.sqrt(case.n * case.out_hw[0] * case.out_hw[1]))
