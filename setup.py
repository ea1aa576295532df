"""Builds the C++ extension (CPU kernels, always) and the CUDA extension (when possible).

Environment:
  FPN_KERNELS_BUILD_CUDA   "auto" (default): build the CUDA kernels when torch has CUDA and nvcc
                           is found; "1": require it; "0": skip it.
  TORCH_CUDA_ARCH_LIST     default "8.0;9.0+PTX" (keeps CI's build short).
  FPN_KERNELS_NO_EXTENSIONS=1  package only (the Makefile's editable install: it then builds the
                           extensions with `setup.py build_ext --inplace`, incrementally).
Build with torch already installed: ``pip install --no-build-isolation -e .``.
"""

import glob
import os
import shutil

from setuptools import find_packages, setup

# torch derives CUDA_HOME from `which nvcc` when it is unset; a wrapper script such as
# /usr/local/bin/nvcc then yields /usr/local, which has no lib64/libcudart. Prefer the toolkit.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists(
    "/usr/local/cuda/bin/nvcc"
):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME at import)

ROOT = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3", "-std=c++20", "-fvisibility=hidden"]


def _sources(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _want_cuda() -> bool:
    flag = os.environ.get("FPN_KERNELS_BUILD_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False
    import torch

    home = cpp_extension.CUDA_HOME
    nvcc = home and os.path.exists(os.path.join(home, "bin", "nvcc"))
    have = torch.version.cuda is not None and bool(nvcc or shutil.which("nvcc"))
    if flag in ("1", "true", "yes", "on") and not have:
        raise RuntimeError(
            "FPN_KERNELS_BUILD_CUDA=1 but torch has no CUDA or nvcc was not found "
            f"(torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME})"
        )
    return have and bool(_sources("csrc/cuda/*.cu"))


def _openmp_flags() -> list[str]:
    """at::parallel_for is a header template: with ATen's OpenMP backend (the x86 wheels) it is
    a `#pragma omp parallel` compiled into *our* library, which runs it on one thread unless we
    build with OpenMP too (measured: the fused kernels' tiles ran serially, 10-25% slower)."""
    import torch

    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return []
    return ["/openmp"] if os.name == "nt" else ["-fopenmp"]


OPENMP_FLAGS = _openmp_flags()

# Headers count as sources for setuptools' up-to-date check (ninja tracks them itself).
HEADERS = _sources("csrc/common/*.h") + _sources("csrc/cpu/*.h")

ext_modules = [] if os.environ.get("FPN_KERNELS_NO_EXTENSIONS") == "1" else [
    cpp_extension.CppExtension(
        "fpn_kernels._C",
        _sources("csrc/ops.cpp") + _sources("csrc/cpu/*.cpp"),
        include_dirs=[os.path.join(ROOT, "csrc")],
        depends=HEADERS,
        extra_compile_args={"cxx": CXX_FLAGS + OPENMP_FLAGS},
        extra_link_args=[] if os.name == "nt" else OPENMP_FLAGS,
    )
]
if ext_modules and _want_cuda():
    # PTX for 9.0 lets newer GPUs JIT the kernels instead of failing with "no kernel image".
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    ext_modules.append(
        cpp_extension.CUDAExtension(
            "fpn_kernels._C_cuda",
            _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            depends=HEADERS,
            extra_compile_args={
                "cxx": CXX_FLAGS,
                "nvcc": ["-O3", "-std=c++20", "--expt-relaxed-constexpr"],
            },
        )
    )

setup(
    name="fpn_kernels",
    version="0.1.0",
    description="Fused FPN top-down merge (1x1 conv + nearest upsample + add): Triton, CUDA, C++",
    packages=find_packages(include=["fpn_kernels", "fpn_kernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy"],
    extras_require={
        "dev": ["pytest", "pytest-benchmark", "hypothesis", "ruff", "mypy", "rich", "matplotlib"],
        "triton": ["triton"],
    },
    ext_modules=ext_modules,
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
