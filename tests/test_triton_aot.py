"""Every shipped config of every Triton kernel, compiled ahead of time for sm_80 and sm_90 on
this GPU-less machine (fpn_kernels/triton/aot.py): no register spills (cuobjdump: STACK and
LOCAL 0), shared memory within the architecture's per-block limit, and tensor-core MMA
(``mma.sync`` on sm_80, ``wgmma`` on sm_90) wherever the dtype has one: fp16, bf16, and fp32
as TF32. fp32 as IEEE must not use tensor cores (that would be TF32 behind the user's back).

The int64-offset specialization (images of 2^31 elements or more) is checked for the two
extremes of register pressure, fp16 (MMA) and IEEE fp32 (FMA), of every GEMM and gather kernel.
All compiles run once per session in a pool of 2 processes; triton's on-disk cache makes a
repeat run take seconds (a cold run about two minutes on 2 cores).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from fpn_kernels.triton import aot  # noqa: E402

VARIANTS = aot.shipped_variants()
INT64_VARIANTS = [
    v.with_int64_offsets() for v in VARIANTS
    if v.use in ("forward", "grad_weight", "grad_top")
    and (v.dtype, v.precision) in (("fp16", None), ("fp32", "ieee"), ("fp32", None))
]


@pytest.fixture(scope="module")
def reports() -> dict:
    compiled = aot.compile_all(VARIANTS + INT64_VARIANTS, aot.ARCHS, jobs=2)
    return {(r.variant, r.arch): r for r in compiled}


@pytest.mark.parametrize("arch", aot.ARCHS, ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("variant", VARIANTS + INT64_VARIANTS, ids=str)
def test_compiles_fast(reports, variant, arch):
    report = reports[(variant, arch)]
    assert report.registers > 0, "cuobjdump reported no registers: the parse is broken"
    assert not report.spills, (
        f"{variant} sm_{arch} ({report.config}) spills: STACK {report.stack_bytes} B, "
        f"LOCAL {report.local_bytes} B per thread at {report.registers} registers"
    )
    assert report.shared_bytes <= aot.SHARED_MEMORY_LIMIT[arch], (
        f"{variant} sm_{arch} needs {report.shared_bytes} B of shared memory"
    )
    if variant.uses_tensor_cores:
        expected = "wgmma" if arch >= 90 else "mma.sync"
        assert report.mma.startswith(expected), f"{variant} sm_{arch}: {report.mma}"
    else:
        assert report.mma == "-", f"{variant} sm_{arch} uses tensor cores: {report.mma}"


def test_every_shipped_config_is_checked():
    lists = aot.config_lists()
    checked = {(v.kernel, v.config_index, v.dtype == "fp32") for v in VARIANTS}
    for kernel, by_size in lists.items():
        for size, configs in by_size.items():
            for index in range(len(configs)):
                assert (kernel, index, size == 4) in checked, (kernel, size, index)
