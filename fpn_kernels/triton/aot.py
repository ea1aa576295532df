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

import itertools
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
        flags = dict(self.flags)
        extra = ""
        if "PIXEL_ALIGN" in flags:
            extra += f"-align{flags['PIXEL_ALIGN']}"
        if flags.get("EXACT"):
            extra += "-exact"
        if self.use in ("forward", "grad_weight") and flags.get("HAS_BIAS") is False:
            extra += "-nobias"
        int64 = "-int64" if flags.get("INT64_INDEX") else ""
        return f"{self.use}-cfg{self.config_index}-{self.dtype}{precision}{layout}{extra}{int64}"

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
    warps: int = 4

    @property
    def blocks_per_sm(self) -> int:
        return blocks_per_sm(self.arch, self.registers, self.warps, self.shared_bytes)

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


_KERNEL_OF = {"forward": "upsample_add_conv1x1_kernel",
              "grad_lateral": "upsample_add_conv1x1_kernel",
              "grad_weight": "conv1x1_weight_grad_kernel",
              "grad_top": "nearest_upsample_grad_kernel", "ordered_sum": "ordered_sum_kernel"}
_GEMM_DTYPES = (("fp16", None), ("bf16", None), ("fp32", "tf32"), ("fp32", "ieee"))
_GATHER_DTYPES = (("fp16", None), ("bf16", None), ("fp32", None))

# What launch.py can pass on a GPU, per kernel use: the constexpr values beyond the config, the
# dtype and the layout (the first value of each is the base variant's). PIXEL_ALIGN =
# launch.pixel_align(P): any power of two up to 16 for NCHW, always 1 for channels_last. On
# CUDA tensors the nearest index is always ATen's CUDA math (indexing.index_kernel_for gives
# "cuda"), so INDEX_TABLES is always False there (the host tables serve CPU tensors under the
# interpreter only), and so is DOT_IN_FP32 (interpreter only). The forward always has a top
# (HAS_TOP), its bias is optional; grad_lateral is the forward kernel with no bias, top or
# index (EXACT False); grad_weight's bias part is optional.
LAUNCH_PIXEL_ALIGNS = (1, 2, 4, 8, 16)
_LAUNCH_FLAGS = {
    "forward": {"HAS_BIAS": (True, False), "EXACT": (False, True),
                "INT64_INDEX": (False, True)},
    "grad_lateral": {"INT64_INDEX": (False, True)},
    "grad_weight": {"HAS_BIAS": (True, False), "INT64_INDEX": (False, True)},
    "grad_top": {"EXACT": (False, True), "INT64_INDEX": (False, True)},
    "ordered_sum": {},
}
_FIXED_FLAGS = {"forward": {"HAS_TOP": True},
                "grad_lateral": {"HAS_BIAS": False, "HAS_TOP": False}}
_ALIGNED_USES = ("forward", "grad_lateral", "grad_weight")  # kernels taking PIXEL_ALIGN


def _layouts(use: str) -> list[tuple[bool | None, int | None]]:
    """(channels_last, PIXEL_ALIGN) pairs launch.py can pass; the first two are the base's."""
    if use == "ordered_sum":
        return [(None, None)]
    if use not in _ALIGNED_USES:
        return [(False, None), (True, None)]
    base: list[tuple[bool | None, int | None]] = [(False, PROFILE_PIXEL_ALIGN), (True, 1)]
    return base + [(False, a) for a in LAUNCH_PIXEL_ALIGNS if a != PROFILE_PIXEL_ALIGN]


def _factors(use: str, size: int) -> dict[str, list]:
    dtypes = _GATHER_DTYPES if use in ("grad_top", "ordered_sum") else _GEMM_DTYPES
    configs = config_lists()[_KERNEL_OF[use]][size]
    return {"config": list(range(len(configs))),
            "dtype": [d for d in dtypes if (d[0] == "fp32") == (size == 4)],
            "layout": _layouts(use),
            **{k: list(v) for k, v in _LAUNCH_FLAGS[use].items()}}


def _variant(use: str, row: dict) -> Variant:
    (dtype, precision), (channels_last, align) = row["dtype"], row["layout"]
    flags = dict(_FIXED_FLAGS.get(use, {}))
    flags.update({k: row[k] for k in _LAUNCH_FLAGS[use]})
    if align is not None:
        flags["PIXEL_ALIGN"] = align
    return Variant(_KERNEL_OF[use], use, row["config"], dtype, precision, channels_last,
                   tuple(sorted(flags.items())))


def _base_rows(use: str, size: int, factors: dict[str, list]) -> list[dict]:
    """config x dtype x layout (NCHW at PROFILE_PIXEL_ALIGN, channels_last), other flags at
    their first value, where launch.py can pick the config."""
    rows = []
    for config in factors["config"]:
        for dtype in factors["dtype"]:
            for layout in factors["layout"][:2]:
                row = {name: values[0] for name, values in factors.items()}
                rows.append(dict(row, config=config, dtype=dtype, layout=layout))
    return [row for row in rows if launchable(use, size, row)]


def launchable(use: str, size: int, row: dict) -> bool:
    """Whether launch.py can pick this row's config for its layout, PIXEL_ALIGN and precision
    (the forward kernel skips tiles that spill on unaligned NCHW rows or on FMA units; the
    others take any)."""
    if _KERNEL_OF[use] != "upsample_add_conv1x1_kernel":
        return True
    from . import kernels

    channels_last, align = row["layout"]
    tensor_cores = row["dtype"][1] != "ieee"
    return kernels.forward_config_allowed(size, row["config"], channels_last, align,
                                          tensor_cores)


def _product(use: str, size: int, factors: dict[str, list]) -> list[dict]:
    """Every row of the factors' cross product that launch.py can pick, as {factor: value}."""
    rows = (dict(zip(factors, values, strict=True))
            for values in itertools.product(*factors.values()))
    return [row for row in rows if launchable(use, size, row)]


def _pairwise(product: list[dict], seed: list[dict]) -> list[dict]:
    """``seed`` plus rows of ``product`` picked greedily (deterministic: the first best row
    each time) until every pair of factor values that meets in some row of ``product`` meets
    in a chosen row: a covering array of strength 2."""
    names = list(product[0])

    def pairs(row):
        return {(a, repr(row[a]), b, repr(row[b])) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(r) for r in product))
    chosen = list(seed)
    for row in seed:
        uncovered -= pairs(row)
    while uncovered:
        best = max(product, key=lambda r: len(pairs(r) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


def shipped_variants() -> list[Variant]:
    """Every shipped config of every kernel, for each dtype, fp32 precision and layout it runs
    with (NCHW at PROFILE_PIXEL_ALIGN), the other flags at their common value (bias, 32-bit
    offsets, "nearest"). The forward kernel counts twice: with its epilogue (forward) and bare
    (grad_lateral)."""
    return [_variant(use, row) for use in _LAUNCH_FLAGS for size in (2, 4)
            for row in _base_rows(use, size, _factors(use, size))]


def launcher_variants(full: bool = False) -> list[Variant]:
    """Specializations launch.py can compile on a GPU (``_LAUNCH_FLAGS``). ``full``: the whole
    cross product of config, dtype (and fp32 precision), layout, PIXEL_ALIGN and flags, per
    kernel use and element size, less the configs launch.py never picks for a layout and
    PIXEL_ALIGN (``launchable``). Else ``shipped_variants`` plus a strength-2 covering array of
    that product: each value of any factor (a config, a dtype, a PIXEL_ALIGN, EXACT, int64
    offsets, ...) is compiled with each value of every other factor at least once."""
    out: dict[Variant, None] = {}
    for use in _LAUNCH_FLAGS:
        for size in (2, 4):
            factors = _factors(use, size)
            product = _product(use, size, factors)
            rows = product if full else _pairwise(product, _base_rows(use, size, factors))
            out.update(dict.fromkeys(_variant(use, row) for row in rows))
    return list(out)


# Per-SM limits for the occupancy estimate: registers, dynamic shared memory (the block's
# reservation of 1 KiB on top), resident warps and blocks.
REGISTERS_PER_SM = 65536
SHARED_MEMORY_PER_SM = {80: 167936, 90: 233472}
SHARED_MEMORY_RESERVED_PER_BLOCK = 1024
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32


def blocks_per_sm(arch: int, registers: int, warps: int, shared_bytes: int) -> int:
    """Resident blocks (CTAs) per SM by the occupancy calculator's rules: registers are
    allocated per warp in units of 256 (so a thread's count rounds up to a multiple of 8)."""
    per_warp = -(-registers * 32 // 256) * 256
    by_registers = REGISTERS_PER_SM // (warps * per_warp)
    by_shared = SHARED_MEMORY_PER_SM[arch] // (shared_bytes + SHARED_MEMORY_RESERVED_PER_BLOCK)
    return min(by_registers, by_shared, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM)


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
             "PIXEL_ALIGN": 1 if variant.channels_last else PROFILE_PIXEL_ALIGN,
             "DOT_IN_FP32": False,
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
        warps=config.num_warps,
    )


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def _compile_job(job: tuple[Variant, int]) -> Report:
    return compile_variant(*job)


def compile_all(variants: Iterable[Variant], archs: Sequence[int] = ARCHS,
                jobs: int = 2) -> list[Report]:
    """Compile every variant for every arch in ``jobs`` spawned worker processes."""
    return compile_cases([(v, arch) for v in variants for arch in archs], jobs)


def compile_cases(work: Sequence[tuple[Variant, int]], jobs: int = 2) -> list[Report]:
    """Compile each (variant, arch) in ``jobs`` spawned worker processes."""
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn"),
                             initializer=_worker_init) as pool:
        return list(pool.map(_compile_job, work, chunksize=4))
