"""Ahead-of-time compilation of every shipped kernel config, for GPUs this machine may not have.

``triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32))``
runs the whole Triton pipeline down to PTX and a cubin (ptxas ships in the triton wheel) with no
GPU and no driver. From the results :func:`compile_variant` reads what matters for speed:
registers, spills (``cuobjdump --dump-resource-usage``: STACK and LOCAL bytes per thread),
shared memory (triton's metadata: it is dynamic, so the cubin says 0) and the tensor-core
instruction in the PTX (``mma.sync`` on sm_80, ``wgmma`` on sm_90).

Used by tests/test_triton_aot.py (assertions) and ``python -m fpn_kernels profile`` (a table).
Compiles run in a spawned pool of worker processes (triton's own on-disk cache makes a repeat
cheap); the workers drop TRITON_INTERPRET, which would turn the kernels into Python.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

ARCHS = (80, 90)
# Largest dynamic shared memory one block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin).
SHARED_MEMORY_LIMIT = {80: 166912, 90: 232448}
# Tensor-core element types: what each dtype (and fp32 precision) multiplies as.
TENSOR_CORE = {("fp16", None), ("bf16", None), ("fp32", "tf32")}

# The pixel count the compile assumes: ResNet-50-FPN's P4 at 800x1216, 50 x 76 = 3800 = 8 * 475,
# the least aligned of the three levels (PIXEL_ALIGN = 8; P3 and P2 are multiples of 16).
PROFILE_PIXEL_ALIGN = 8

# Pointer element types per kernel argument ("dt": the tensors' dtype); other arguments are i32.
_POINTERS = {
    "upsample_add_conv1x1_kernel": {
        "lateral_ptr": "dt", "weight_ptr": "dt", "bias_ptr": "dt", "top_ptr": "dt",
        "src_row_ptr": "i32", "src_col_ptr": "i32", "out_ptr": "dt",
    },
    "conv1x1_weight_grad_kernel": {
        "grad_out_ptr": "dt", "lateral_ptr": "dt", "partial_ptr": "fp32",
    },
    "ordered_sum_kernel": {"partial_ptr": "fp32", "out_ptr": "dt", "tail_ptr": "dt"},
    "nearest_upsample_grad_kernel": {
        "grad_out_ptr": "dt", "row_begin_ptr": "i32", "col_begin_ptr": "i32",
        "grad_top_ptr": "dt",
    },
}
# Integer arguments the JIT would see as multiples of 16 (it specializes on that) for FPN
# shapes: channel counts (256, 512, 1024, 2048), the split chunk (a multiple of BLOCK_K, always),
# the partial buffers' size. Image sizes are not specialized (the kernels' do_not_specialize),
# so no compile assumes anything about them.
_DIVISIBLE_INTS = {"C_in", "C_out", "C", "chunk_pixels", "numel"}
# Float arguments: the nearest-index scales.
_FLOATS = {"scale_h", "scale_w"}


@dataclass(frozen=True)
class Variant:
    """One compiled specialization: a kernel, what it is used for, a config, dtype, layout."""

    kernel: str  # function name in kernels.py
    use: str  # forward | grad_lateral | grad_weight | grad_top | ordered_sum
    config_index: int
    dtype: str  # fp16 | bf16 | fp32
    precision: str | None = None  # "tf32" | "ieee" for fp32 GEMMs, None otherwise
    channels_last: bool | None = None
    flags: tuple[tuple[str, object], ...] = field(default=())

    def __str__(self) -> str:
        layout = {None: "", False: "-nchw", True: "-nhwc"}[self.channels_last]
        precision = f"-{self.precision}" if self.precision else ""
        int64 = "-int64" if ("INT64_INDEX", True) in self.flags else ""
        return f"{self.use}-cfg{self.config_index}-{self.dtype}{precision}{layout}{int64}"

    def with_int64_offsets(self) -> Variant:
        """The same variant specialized for images of 2^31 elements or more."""
        return replace(self, flags=tuple(sorted((*self.flags, ("INT64_INDEX", True)))))

    @property
    def uses_tensor_cores(self) -> bool:
        return self.use != "grad_top" and self.use != "ordered_sum" and (
            (self.dtype, self.precision) in TENSOR_CORE)


@dataclass(frozen=True)
class Report:
    variant: Variant
    arch: int
    config: str
    registers: int
    stack_bytes: int
    local_bytes: int
    shared_bytes: int
    mma: str  # the tensor-core instruction found in the PTX, or "-"

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0


def config_lists():
    from . import kernels

    return {
        "upsample_add_conv1x1_kernel": kernels.UPSAMPLE_ADD_CONV1X1_CONFIGS,
        "conv1x1_weight_grad_kernel": kernels.CONV1X1_WEIGHT_GRAD_CONFIGS,
        "ordered_sum_kernel": {2: kernels.ORDERED_SUM_CONFIGS, 4: kernels.ORDERED_SUM_CONFIGS},
        "nearest_upsample_grad_kernel": kernels.NEAREST_UPSAMPLE_GRAD_CONFIGS,
    }


def shipped_variants() -> list[Variant]:
    """Every shipped config of every kernel, for each dtype, fp32 precision and layout it runs
    with. The forward kernel counts twice: with its epilogue (forward) and bare (grad_lateral)."""
    gemm_dtypes = [("fp16", None), ("bf16", None), ("fp32", "tf32"), ("fp32", "ieee")]
    layouts = (False, True)
    lists = config_lists()
    out: list[Variant] = []

    def add(kernel, use, dtypes, layouts, **flags):
        for dtype, precision in dtypes:
            size = 4 if dtype == "fp32" else 2
            for index in range(len(lists[kernel][size])):
                for channels_last in layouts:
                    out.append(Variant(kernel, use, index, dtype, precision, channels_last,
                                       tuple(sorted(flags.items()))))

    add("upsample_add_conv1x1_kernel", "forward", gemm_dtypes, layouts,
        HAS_BIAS=True, HAS_TOP=True)
    add("upsample_add_conv1x1_kernel", "grad_lateral", gemm_dtypes, layouts,
        HAS_BIAS=False, HAS_TOP=False)
    add("conv1x1_weight_grad_kernel", "grad_weight", gemm_dtypes, layouts, HAS_BIAS=True)
    add("nearest_upsample_grad_kernel", "grad_top", [(d, None) for d in ("fp16", "bf16", "fp32")],
        layouts)
    add("ordered_sum_kernel", "ordered_sum", [(d, None) for d in ("fp16", "bf16", "fp32")],
        (None,))
    return out


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(_cuobjdump()), "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", text))
    if set(found) != {"REG", "STACK", "LOCAL"}:
        raise RuntimeError(f"cuobjdump printed no resource usage:\n{text}")
    return {k: int(v) for k, v in found.items()}


def _mma_instruction(ptx: str) -> str:
    """The first tensor-core instruction in the PTX, without its operand types."""
    match = re.search(r"\b(wgmma\.mma_async\.[\w.]+|mma\.sync\.aligned\.[\w.]+)", ptx)
    if match is None:
        return "-"
    return ".".join(part for part in match.group(1).split(".")[:4])


def compile_variant(variant: Variant, arch: int) -> Report:
    """Compile one variant for sm_``arch``; triton is imported here, in the calling process."""
    import triton
    from triton.backends.compiler import GPUTarget

    from . import kernels

    fn = getattr(kernels, variant.kernel)
    size = 4 if variant.dtype == "fp32" else 2
    config = config_lists()[variant.kernel][size][variant.config_index]
    pointers = _POINTERS[variant.kernel]
    constexprs = dict(variant.flags, **config.kwargs)
    named = {"CHANNELS_LAST": variant.channels_last, "INT64_INDEX": False,
             "PIXEL_ALIGN": PROFILE_PIXEL_ALIGN, "DOT_IN_FP32": False,
             "DOT_TF32": variant.precision != "ieee", "INDEX_TABLES": False,
             "EXACT": False}
    signature, attrs = {}, {}
    for index, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            if name not in constexprs:
                constexprs[name] = named[name]
        elif name in pointers:
            kind = pointers[name]
            signature[name] = "*" + (variant.dtype if kind == "dt" else kind)
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif name in _FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if name in _DIVISIBLE_INTS:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs,
                                       attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config.num_warps,
                                       "num_stages": config.num_stages})
    usage = _resource_usage(compiled.asm["cubin"])
    meta = ", ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return Report(
        variant=variant,
        arch=arch,
        config=f"{meta}, warps={config.num_warps}, stages={config.num_stages}",
        registers=usage["REG"],
        stack_bytes=usage["STACK"],
        local_bytes=usage["LOCAL"],
        shared_bytes=int(compiled.metadata.shared),
        mma=_mma_instruction(compiled.asm["ptx"]),
    )


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def _compile_job(job: tuple[Variant, int]) -> Report:
    return compile_variant(*job)


def compile_all(variants: Iterable[Variant], archs: Sequence[int] = ARCHS,
                jobs: int = 2) -> list[Report]:
    """Compile every variant for every arch in ``jobs`` spawned worker processes."""
    work = [(v, arch) for v in variants for arch in archs]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                             initializer=_worker_init) as pool:
        return list(pool.map(_compile_job, work, chunksize=4))
