"""Compile csrc/cuda/*.cu for each GPU architecture (device code only) and report what ptxas
says about every kernel: registers, stack frame, spill stores/loads. Exits 1 on any spill.

No GPU needed, only nvcc. Usage: ``python tools/build_cuda_check.py [--arch 80 90]``.
The compiles run in parallel, one per (file, arch); each takes a minute or two.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'")
_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_REGS = re.compile(r"Used (\d+) registers")


@dataclass
class KernelUsage:
    name: str
    arch: str
    registers: int = -1
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0


def parse_ptxas(log: str) -> list[KernelUsage]:
    """Kernels in the order ptxas compiled them, from ``-Xptxas -v`` output."""
    kernels: list[KernelUsage] = []
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            kernels.append(KernelUsage(m.group(1), m.group(2)))
        elif kernels and (m := _FRAME.search(line)):
            k = kernels[-1]
            k.stack, k.spill_stores, k.spill_loads = (int(g) for g in m.groups())
        elif kernels and (m := _REGS.search(line)):
            kernels[-1].registers = int(m.group(1))
    return kernels


def nvcc_command(source: str, arch: str, out: str) -> list[str]:
    import torch
    from torch.utils import cpp_extension

    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    nvcc = nvcc if os.path.exists(nvcc) else (shutil.which("nvcc") or "nvcc")
    includes = [*cpp_extension.include_paths(device_type="cuda"), os.path.join(ROOT, "csrc")]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    return [
        nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++20", "-Xptxas=-v",
        *cpp_extension.COMMON_NVCC_FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        *(f"-I{i}" for i in includes), "-o", out, source,
    ]  # fmt: skip


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    if len(lines) != len(names):
        return names
    # "void ns::(anonymous namespace)::kernel<float>(args...)" -> "kernel<float>"
    return [re.sub(r"^void |\(anonymous namespace\)::|\w+::|\(.*", "", s) for s in lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=["80", "90"], help="compute capabilities")
    args = parser.parse_args(argv)
    sources = sorted(
        os.path.join(ROOT, "csrc", "cuda", f)
        for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
        if f.endswith(".cu")
    )
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        jobs = []
        for source in sources:
            for arch in args.arch:
                out = os.path.join(tmp, f"{os.path.basename(source)}.sm_{arch}.cubin")
                cmd = nvcc_command(source, arch, out)
                jobs.append((source, arch, subprocess.Popen(
                    cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        for source, arch, proc in jobs:
            log = proc.communicate()[0]
            name = os.path.relpath(source, ROOT)
            if proc.returncode != 0:
                print(f"{name} sm_{arch}: nvcc failed\n{log}")
                failed = True
                continue
            kernels = parse_ptxas(log)
            if not kernels:
                print(f"{name} sm_{arch}: ptxas reported no kernels\n{log}")
                failed = True
            for k, pretty in zip(kernels, demangle([k.name for k in kernels]), strict=True):
                spills = k.spill_stores + k.spill_loads
                failed |= spills > 0
                print(
                    f"{name} {k.arch}: {k.registers:3d} regs, {k.stack:4d} B stack, "
                    f"{k.spill_stores} B spill stores, {k.spill_loads} B spill loads"
                    f"{'  <-- SPILLS' if spills else ''}  {pretty}"
                )
    print("FAIL: spills or build errors" if failed else "OK: no spills")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
