"""torch.compile sees the Triton kernels (fpn_kernels/triton/graph.py): where the backend is
"triton", the AOTDispatcher decomposes both ops into ``triton_kernel_wrapper_functional`` nodes
of our kernels (which Inductor and AOTInductor compile as user-defined kernels: no Python per
call), with the outputs and gradients of the eager call bit for bit. Every other backend, and
symbolic sizes, keep the fused node; torch.export keeps it too; eager launches stay plain.

Two processes, like tests/test_triton_interpret.py: the graphs are traced and run under
TRITON_INTERPRET=1 (a fresh process, the kernels' JITFunction twins running the interpreter on
CPU tensors), while torch's own analysis of each launch (which pointers a kernel writes: the
TTIR, which the interpreter's patched triton.language cannot build) runs here, with the real
JITFunctions and triton's sm_90 target, as on a GPU.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from conftest import run_pytest_under_interpreter

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
triton = pytest.importorskip("triton")

OP_NAMES = ("fpn_kernels::upsample_add_conv1x1", "fpn_kernels::upsample_add_conv1x1_backward")
KERNELS = {"upsample_add_conv1x1_kernel", "conv1x1_weight_grad_kernel", "ordered_sum_kernel",
           "nearest_upsample_grad_kernel"}


if not INTERPRETING:
    from triton.backends.compiler import GPUTarget

    from fpn_kernels import _cpp
    from fpn_kernels.triton import launch

    def test_graphs_in_a_fresh_interpreter_process():
        run = run_pytest_under_interpreter(str(Path(__file__).resolve()))
        assert " passed" in run.stdout, run.stdout[-2000:]
        if _cpp.load("_C") is None:  # else the "cpu" backend case skips there
            assert " skipped" not in run.stdout, run.stdout[-2000:]

    class _Sm90Driver:
        """What torch's launch analysis asks triton's active driver: the target to build TTIR
        for (there is no GPU driver here)."""

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    @pytest.fixture
    def sm90_driver():
        driver = triton.runtime.driver
        previous = driver._active
        driver.set_active(_Sm90Driver())
        yield
        driver._active = previous

    @pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
    @pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
    def test_torch_finds_what_each_launch_writes(monkeypatch, sm90_driver, channels_last, dtype):
        # What triton_kernel_wrapper_functional clones (tensors_to_clone) is what torch's TTIR
        # analysis finds written: exactly the outputs, so no input counts as mutated. A launch
        # it cannot analyse (a str constexpr did that) clones every input.
        from torch._higher_order_ops import triton_kernel_wrap as wrap

        calls = []
        monkeypatch.setattr(launch, "_launch", lambda kernel, grid, args, flags, config:
                            calls.append((kernel, args, flags, config)))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        lateral = torch.empty(2, 64, 19, 10, dtype=dtype).contiguous(memory_format=fmt)
        weight, bias = torch.empty(32, 64, dtype=dtype), torch.empty(32, dtype=dtype)
        top = torch.empty(2, 32, 10, 5, dtype=dtype).contiguous(memory_format=fmt)
        grad_out = torch.empty(2, 32, 19, 10, dtype=dtype).contiguous(memory_format=fmt)
        launch.forward(lateral, weight, bias, top, "nearest-exact", None, channels_last, "cuda")
        launch.backward(grad_out, lateral, weight, [10, 5], "nearest-exact", None,
                        channels_last, "cuda", [True] * 4)
        writes = {"upsample_add_conv1x1_kernel": ["out_ptr"],
                  "conv1x1_weight_grad_kernel": ["partial_ptr"],
                  "ordered_sum_kernel": ["out_ptr", "tail_ptr"],
                  "nearest_upsample_grad_kernel": ["grad_top_ptr"]}
        assert sorted(kernel.fn.__name__ for kernel, *_ in calls) == sorted(
            [*KERNELS, "upsample_add_conv1x1_kernel"])
        for kernel, args, flags, config in calls:
            kwargs = {**dict(zip(kernel.arg_names, args, strict=False)), **flags,
                      **config.kwargs}
            assert set(kwargs) == set(kernel.arg_names)
            kernel_idx = wrap.kernel_side_table.add_kernel(kernel)
            constants_idx = wrap.kernel_side_table.add_constant_args({})
            found = wrap.get_mutated_tensors(kernel_idx, constants_idx, kwargs, {})
            assert sorted(found) == writes[kernel.fn.__name__], kernel.fn.__name__

else:
    from conftest import make_inputs
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    from fpn_kernels import _cpp, upsample_add_conv1x1

    # torch cannot build the twins' TTIR here (see the module docstring), so it assumes every
    # input is written and warns once per launch: true to the values, only slower.
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)

    class Graphs:
        """An AOT backend that keeps the forward and backward graphs it runs."""

        def __init__(self):
            self.modules = []
            self.backend = aot_autograd(fw_compiler=self._keep, bw_compiler=self._keep)

        def _keep(self, gm, example_inputs):
            self.modules.append(gm)
            return make_boxed_func(gm.forward)

        def targets(self, index: int) -> list:
            return [node for node in self.modules[index].graph.nodes
                    if node.op == "call_function"]

        def kernels(self, index: int) -> list[str]:
            return [kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__
                    for node in self.targets(index)
                    if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional]

        def fused_ops(self, index: int) -> list[str]:
            return [node.target.name() for node in self.targets(index)
                    if isinstance(node.target, torch._ops.OpOverload)
                    and node.target.namespace == "fpn_kernels"]

    def merge(backend: str, mode: str = "nearest", scale_factor=None):
        def f(lateral, weight, bias, top):
            return upsample_add_conv1x1(lateral, weight, bias, top, mode=mode,
                                        scale_factor=scale_factor, backend=backend)
        return f

    def eager_and_compiled(f, inputs, **compile_kwargs):
        """(out, grads) of f eagerly and compiled (fresh leaves each), and the graphs."""
        torch._dynamo.reset()
        graphs = Graphs()
        compiled = torch.compile(f, backend=graphs.backend, fullgraph=True, **compile_kwargs)
        results = []
        for fn in (f, compiled):
            leaves = [t.detach().clone().requires_grad_() if t is not None else None
                      for t in inputs]
            out = fn(*leaves)
            grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(
                out.dtype).contiguous(memory_format=torch.channels_last
                                      if leaves[0].is_contiguous(
                                          memory_format=torch.channels_last)
                                      and not leaves[0].is_contiguous()
                                      else torch.contiguous_format)
            out.backward(grad)
            results.append((out.detach(), [t.grad for t in leaves if t is not None]))
        return results, graphs

    CASES = [  # (dtype, channels_last, bias, mode, scale_factor, out_hw, top_hw)
        (torch.float32, False, True, "nearest", None, (19, 10), (10, 5)),
        (torch.bfloat16, True, False, "nearest-exact", None, (19, 10), (10, 5)),
        (torch.float16, False, True, "nearest", (1.9, 2.0), (19, 10), (10, 5)),
    ]

    @pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[3]}-{c[4]}")
    def test_triton_backend_compiles_to_its_kernels(case):
        dtype, channels_last, bias, mode, scale_factor, out_hw, top_hw = case
        inputs = make_inputs(2, 24, 20, out_hw, top_hw, dtype=dtype, bias=bias,
                             channels_last=channels_last)
        (eager, compiled), graphs = eager_and_compiled(merge("triton", mode, scale_factor),
                                                        inputs)
        assert len(graphs.modules) == 2  # forward, backward
        assert graphs.kernels(0) == ["upsample_add_conv1x1_kernel"]
        assert sorted(graphs.kernels(1)) == sorted(KERNELS)
        assert graphs.fused_ops(0) == [] and graphs.fused_ops(1) == []
        assert torch.equal(compiled[0], eager[0])
        assert len(compiled[1]) == len(eager[1])
        for got, want in zip(compiled[1], eager[1], strict=True):
            assert torch.equal(got, want)

    @pytest.mark.parametrize("backend", ["eager", "cpu"])
    def test_other_backends_keep_the_fused_nodes(backend):
        if backend == "cpu" and _cpp.load("_C") is not None:
            pytest.skip(_cpp.load("_C"))
        inputs = make_inputs(2, 24, 20, (19, 10), (10, 5))
        (eager, compiled), graphs = eager_and_compiled(merge(backend), inputs)
        assert graphs.fused_ops(0) == ["fpn_kernels::upsample_add_conv1x1"]
        assert graphs.fused_ops(1) == ["fpn_kernels::upsample_add_conv1x1_backward"]
        assert graphs.kernels(0) == [] and graphs.kernels(1) == []
        assert torch.equal(compiled[0], eager[0])

    def test_symbolic_sizes_keep_the_fused_node():
        # The launch's host code needs concrete sizes (PIXEL_ALIGN, the config, the float32
        # scales): decomposed, every size would be guarded on and recompile.
        inputs = make_inputs(2, 24, 20, (19, 10), (10, 5))
        (eager, compiled), graphs = eager_and_compiled(merge("triton"), inputs, dynamic=True)
        assert graphs.fused_ops(0) == ["fpn_kernels::upsample_add_conv1x1"]
        assert graphs.kernels(0) == []
        assert torch.equal(compiled[0], eager[0])

    def test_export_keeps_the_fused_node():
        lateral, weight, bias, top = make_inputs(2, 24, 20, (19, 10), (10, 5))

        class Merge(torch.nn.Module):
            def forward(self, lateral, top):
                return upsample_add_conv1x1(lateral, weight, bias, top, backend="triton")

        exported = torch.export.export(Merge(), (lateral, top))
        ops = [node.target for node in exported.graph.nodes if node.op == "call_function"]
        assert torch.ops.fpn_kernels.upsample_add_conv1x1.default in ops
        assert torch.ops.higher_order.triton_kernel_wrapper_functional not in ops
        assert torch.equal(exported.module()(lateral, top),
                           upsample_add_conv1x1(lateral, weight, bias, top, backend="triton"))

    def test_eager_launches_are_plain(monkeypatch):
        def traced(kernel):
            raise AssertionError("an eager launch went through wrap_triton")

        monkeypatch.setattr(torch.library, "wrap_triton", traced)
        entries = len(kernel_side_table.constant_args)
        lateral, weight, bias, top = make_inputs(2, 24, 20, (19, 10), (10, 5),
                                                 requires_grad=True)
        upsample_add_conv1x1(lateral, weight, bias, top, backend="triton").sum().backward()
        assert len(kernel_side_table.constant_args) == entries

    def test_kernels_are_recorded_for_the_compile_caches():
        from triton.runtime.jit import JITFunction

        from fpn_kernels import backends

        assert backends.BACKENDS["triton"].unavailable_reason is None
        for name in OP_NAMES:
            recorded = torch._library.triton.get_triton_kernels_for_op(name)
            assert all(isinstance(k, JITFunction) for k in recorded)
            assert {k.fn.__name__ for k in recorded} == KERNELS
