"""How ``torch.compile`` and AOTInductor see the Triton kernels: ``torch.library.triton_op``'s
mechanism on the existing custom ops.

``triton_op(name, fn)`` is ``custom_op(name, fn)`` (eager runs ``fn`` with
``set_wrap_triton_enabled(False)``: plain launches) + ``register_fake(fn)`` + a
``FunctionalTensorMode`` torch_dispatch rule that runs ``fn`` under the mode, so that in the
AOTDispatcher (torch.compile, and Inductor compiling an exported program for AOTInductor) the op
decomposes into its ``wrap_triton`` launches, ``triton_kernel_wrapper_functional`` nodes that
Inductor compiles and calls as user-defined kernels: no Python per call. Under
``torch.export`` (``custom_triton_ops_decomposition_disabled()``) the op stays one node.

``fpn_kernels::upsample_add_conv1x1`` and its backward cannot simply be ``triton_op``s: their
body dispatches across backends (CPU C++, CUDA C++, eager, Triton), the fake kernel is
hand-written (``fn`` itself is not fake-traceable for the C++ backends), and the CPU graphs must
keep the single fused node (Inductor runs it as a fallback kernel, ONNX export decomposes it
with fpn_kernels.export). So :func:`register` adds triton_op's rule to the existing custom ops
(name, schema, fake kernel and autograd unchanged) with one more condition: the op decomposes
only where its backend resolves to "triton" and every size is concrete. Otherwise the rule
hands the op back to the mode (``mode.__torch_dispatch__``), which keeps the node.

Why concrete sizes only: the host code computes compile-time facts from the sizes (PIXEL_ALIGN,
the config, ATen's float32 nearest scales, the grad_top range lengths), so decomposing with
symbolic sizes would guard on every size and recompile per image size; with symbolic sizes
(``dynamic=True``, or automatic dynamic after a second size) the node is kept and its launches
run from Python per call, compiling nothing new (the kernels do not specialize on sizes).

The kernels are also recorded in ``torch._library.triton.triton_ops_to_kernels`` under both op
names, as ``triton_op`` does: AOTAutograd's cache key hashes their sources, so a kernel edit
invalidates a cached graph that decomposed the op.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

OP_NAMES = ("fpn_kernels::upsample_add_conv1x1", "fpn_kernels::upsample_add_conv1x1_backward")


def _decomposition_disabled() -> bool:
    """torch.export's switch (its NOTE [Export custom triton op]): the node is kept."""
    try:
        from torch.export._trace import custom_triton_ops_decomposition_disabled
    except ImportError:  # pragma: no cover - every supported torch has it
        return not getattr(torch._functorch.config, "decompose_custom_triton_ops", True)
    return custom_triton_ops_decomposition_disabled()


def _concrete(*values) -> bool:
    """No SymInt among the tensors' sizes and the int lists."""
    for value in values:
        sizes = value.shape if isinstance(value, torch.Tensor) else value
        if sizes is None:
            continue
        if any(not isinstance(s, int) for s in sizes):
            return False
    return True


def _recognized(types) -> bool:
    from torch._subclasses import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return all(issubclass(t, FakeTensor) or t in (torch.Tensor, FunctionalTensor)
               for t in types)


def decomposes(arguments: dict, resolve: Callable) -> bool:
    """Whether the op with these (bound) arguments decomposes into its Triton launches."""
    lateral = arguments["lateral"]
    if _decomposition_disabled() or not _concrete(lateral, arguments.get("top"),
                                                  arguments.get("grad_out"),
                                                  arguments.get("top_hw")):
        return False
    return resolve(arguments["backend"], lateral) == "triton"


def _rule(body: Callable, resolve: Callable):
    signature = inspect.signature(body)

    def functional_decomposition(mode, op, types, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if not decomposes(bound.arguments, resolve):
            return mode.__torch_dispatch__(op, types, args, kwargs)
        if not _recognized(types):
            return NotImplemented
        from . import launch

        with mode, launch.traced_launches():
            return body(*args, **kwargs)

    return functional_decomposition


def register(ops: tuple, resolve: Callable) -> None:
    """Add the decomposition rule to each CustomOpDef in ``ops`` (the forward and the backward
    op); ``resolve(backend, lateral)`` is ops.py's backend resolution."""
    from torch._subclasses.functional_tensor import FunctionalTensorMode

    for op in ops:
        op.register_torch_dispatch(FunctionalTensorMode, _rule(op._init_fn, resolve))


def kernels() -> list:
    """Every Triton kernel the ops may launch, as wrap_triton takes them."""
    from . import kernels as k
    from .launch import traceable

    return [traceable(fn) for fn in (k.upsample_add_conv1x1_kernel,
                                     k.conv1x1_weight_grad_kernel, k.ordered_sum_kernel,
                                     k.nearest_upsample_grad_kernel)]


def record_kernels() -> None:
    """``triton_ops_to_kernels[op] = kernels()`` for both ops (see the module docstring)."""
    table = getattr(torch._library.triton, "triton_ops_to_kernels", None)
    if table is None:  # pragma: no cover - every supported torch has it
        return
    found = kernels()
    for name in OP_NAMES:
        table[name] = found
