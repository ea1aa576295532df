"""The machine a benchmark ran on, and its measured limits (the roofline's two peaks)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass
from typing import Any

import torch

from ..precision import cudnn_conv_allows_tf32
from .timing import Timing, TimingPolicy, time_all


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: str) -> dict:
    info: dict[str, Any] = {
        "device": device,
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "fpn_kernels": _version("fpn_kernels"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    # fp32 convs and matmuls run as TF32 when these are on (eager's default
                    # for cuDNN): it changes both the speed and the error of every fp32 row.
                    cudnn_allow_tf32=cudnn_conv_allows_tf32(),
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return info


@dataclass(frozen=True)
class Peaks:
    """Measured: GEMM GFLOP/s per dtype (a large ``torch.mm``) and streaming GB/s (a large copy,
    read + write), each from the 20th-percentile time of its calls: a peak is what the machine
    can do, and load on a shared machine only slows calls down."""

    gemm_gflops: dict[str, float]
    stream_gbps: float
    gemm_size: int
    copy_mib: int
    measurements: tuple[dict, ...] = ()  # the separate measurements `best` combined

    @staticmethod
    def best(*peaks: Peaks) -> Peaks:
        """The higher figure of each peak over several measurements."""
        gemm = {dtype: max(p.gemm_gflops[dtype] for p in peaks) for dtype in peaks[0].gemm_gflops}
        return Peaks(gemm, max(p.stream_gbps for p in peaks), peaks[0].gemm_size,
                     peaks[0].copy_mib,
                     tuple({"gemm_gflops": p.gemm_gflops, "stream_gbps": p.stream_gbps}
                           for p in peaks))

    def as_dict(self) -> dict:
        return {"gemm_gflops": self.gemm_gflops, "stream_gbps": self.stream_gbps,
                "gemm_size": self.gemm_size, "copy_mib": self.copy_mib,
                "method": f"20th-percentile time of torch.mm({self.gemm_size}x{self.gemm_size}) "
                          f"(on CPU, float16/bfloat16 at least float32's) "
                          f"and of a {self.copy_mib} MiB tensor copy; the best of "
                          f"{max(1, len(self.measurements))} measurements (start and end)",
                "measurements": list(self.measurements)}


# (GEMM size, copy MiB) per device: large enough to reach the peak, small enough to take a few
# seconds in all.
PEAK_SIZES = {"cpu": (2048, 256), "cuda": (8192, 1024)}


def _measure(fn, device: str) -> Timing:
    # A few large calls: the median is stable at these sizes.
    policy = TimingPolicy(min_repeats=5, max_repeats=20, budget_s=1.0)
    return time_all({"peak": fn}, policy, device)["peak"]


def _gemm_gflops(dtype: torch.dtype, device: str, gemm_size: int) -> float:
    a = torch.randn(gemm_size, gemm_size, device=device).to(dtype)
    b = torch.randn(gemm_size, gemm_size, device=device).to(dtype)
    out = torch.empty(gemm_size, gemm_size, device=device, dtype=dtype)
    timing = _measure(lambda: torch.mm(a, b, out=out), device)
    return 2 * gemm_size**3 / (timing.p20_ms * 1e6)


def measure_peaks(device: str, dtypes: list[torch.dtype]) -> Peaks:
    """Measure the peaks on ``device`` (one GEMM per dtype, one copy). On a CPU the float16 /
    bfloat16 peak is at least the float32 one: without native instructions for them (AVX2
    machines) torch.mm emulates them at a fraction of a GFLOP/s, while a kernel (ours) converts
    tiles and runs float32 GEMMs."""
    gemm_size, copy_mib = PEAK_SIZES[device]
    gemm = {str(d).replace("torch.", ""): _gemm_gflops(d, device, gemm_size) for d in dtypes}
    reduced = [name for name in gemm if name in ("float16", "bfloat16")]
    if device == "cpu" and reduced:
        fp32 = gemm.get("float32") or _gemm_gflops(torch.float32, device, gemm_size)
        gemm.update({name: max(gemm[name], fp32) for name in reduced})
    src = torch.empty(copy_mib * 2**20 // 4, device=device, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src).fill_(0.0)  # touched: page faults are not the copy's cost
    timing = _measure(lambda: dst.copy_(src), device)
    stream = 2 * src.numel() * src.element_size() / (timing.p20_ms * 1e6)
    return Peaks(gemm, stream, gemm_size, copy_mib)
