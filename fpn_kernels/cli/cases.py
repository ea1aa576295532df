"""What `bench` and the benchmark suite time: FPN top-down level shapes, presets, inputs and the
implementations under test.

An implementation ("impl") is a function ``(lateral, weight, bias, top) -> out``:

* ``eager``: :func:`fpn_kernels.upsample_add_conv1x1_reference` (conv2d + interpolate + add),
  the baseline every speedup and error is measured against;
* ``compile``: ``torch.compile`` of that same function (mode "max-autotune" on CUDA);
* one per fpn_kernels backend, through the public op: ``cpu``, ``triton``, ``cuda``, and
  ``op-eager`` (the op's eager backend, which shows the custom op's own overhead);
* ``conv-only`` (``bench --gemm-floor``): not an implementation but a floor, eager's 1x1 conv
  alone (``conv2d(lateral, weight, bias)``, oneDNN on CPU, cuDNN on CUDA; its backward for
  fwd+bwd) without the upsample and the add. eager / conv-only is the most a fused kernel whose
  GEMMs are only as fast as eager's can gain on that level.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import backends, upsample_add_conv1x1, upsample_add_conv1x1_reference
from . import report

Impl = Callable[[Tensor, Tensor, "Tensor | None", Tensor], Tensor]

EAGER, COMPILE = "eager", "compile"
OP_EAGER = "op-eager"  # the "eager" backend through the op: not to be confused with EAGER
CONV_ONLY = report.CONV_ONLY  # a floor (eager's GEMMs alone), not an implementation of the op
DIRECTIONS = ("fwd", "fwd+bwd")
LAYOUTS = ("nchw", "channels_last")


def parse_names(text: str, allowed: Sequence[str]) -> list[str]:
    """The names of a comma list, each one of ``allowed``; "both" stands for the two of a
    two-name list (``--layout both``, ``--mode both``). Raises ValueError naming what came."""
    expected = f"expected a comma list of {', '.join(allowed)}"
    names: list[str] = []
    for item in (t.strip() for t in text.split(",")):
        if item == "both" and len(allowed) == 2:
            names += [n for n in allowed if n not in names]
        elif item in allowed:
            names += [] if item in names else [item]
        elif item:
            raise ValueError(expected + (" or both" if len(allowed) == 2 else "")
                             + f"; got {item!r}")
    if not names:
        raise ValueError(f"{expected}; got {text!r}")
    return names


DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Level:
    """One top-down merge: ``lateral (n, c_in, *out_hw)`` and ``top (n, c_out, *top_hw)``."""

    name: str
    n: int
    c_in: int
    c_out: int
    out_hw: tuple[int, int]
    top_hw: tuple[int, int]

    @property
    def pixels(self) -> int:
        return self.out_hw[0] * self.out_hw[1]

    @property
    def top_pixels(self) -> int:
        return self.top_hw[0] * self.top_hw[1]

    def describe(self) -> str:
        (h_out, w_out), (h_top, w_top) = self.out_hw, self.top_hw
        return f"N={self.n} {self.c_in}x{h_out}x{w_out} <- {self.c_out}x{h_top}x{w_top}"

    def as_dict(self) -> dict:
        return {"n": self.n, "c_in": self.c_in, "c_out": self.c_out,
                "out_hw": list(self.out_hw), "top_hw": list(self.top_hw)}

    def smoke(self) -> Level:
        """A small level of the same structure (channels / 16, spatial / 8, N = 1) for smoke
        runs: the kernels' code paths are the same, the run takes milliseconds."""
        def shrink(size: int, by: int, floor: int) -> int:
            return max(floor, size // by)
        return Level(
            self.name, 1, shrink(self.c_in, 16, 4), shrink(self.c_out, 16, 4),
            (shrink(self.out_hw[0], 8, 2), shrink(self.out_hw[1], 8, 2)),
            (shrink(self.top_hw[0], 8, 1), shrink(self.top_hw[1], 8, 1)),
        )


def _halve(size: int) -> int:
    # Every ResNet stride-2 stage (7x7/2 pad 3, 3x3/2 pad 1, 1x1/2 in the shortcut) gives
    # floor((size - 1) / 2) + 1 = ceil(size / 2).
    return -(-size // 2)


def resnet50_fpn_levels(n: int, image_hw: tuple[int, int], c_out: int = 256) -> list[Level]:
    """The three top-down merges of a ResNet-50 FPN on an ``image_hw`` input: P4 (C4, 1024
    channels, stride 16) <- C5 size, P3 (C3, 512, stride 8) <- P4, P2 (C2, 256, stride 4) <- P3."""
    sizes = {}
    h, w = image_hw
    for stride_log2 in range(1, 6):
        h, w = _halve(h), _halve(w)
        sizes[stride_log2] = (h, w)
    return [
        Level("P4", n, 1024, c_out, sizes[4], sizes[5]),
        Level("P3", n, 512, c_out, sizes[3], sizes[4]),
        Level("P2", n, 256, c_out, sizes[2], sizes[3]),
    ]


@dataclass(frozen=True)
class Preset:
    description: str
    levels: Callable[[], list[Level]]
    image_hw: tuple[int, int] | None = None  # the ResNet-50 input, for the end-to-end neck


def resnet50_preset(n: int, image_hw: tuple[int, int], note: str = "") -> Preset:
    return Preset(f"ResNet-50-FPN, {image_hw[0]}x{image_hw[1]} image, N={n}{note}",
                  lambda: resnet50_fpn_levels(n, image_hw), image_hw)


PRESETS: dict[str, Preset] = {
    "r50-800x1216-n2": resnet50_preset(2, (800, 1216), " (default)"),
    "r50-800x1216-n1": resnet50_preset(1, (800, 1216)),
    "r50-512x512": resnet50_preset(2, (512, 512)),
    "seed": Preset("the seed's TinyFPN on a 256x256 image, N=1, C_out=32",
                   lambda: [Level("P2", 1, 128, 32, (64, 64), (32, 32)),
                            Level("P1", 1, 64, 32, (128, 128), (64, 64))]),
}
DEFAULT_PRESET = "r50-800x1216-n2"


def preset_levels(name: str) -> list[Level]:
    if name not in PRESETS:
        raise ValueError(f"preset: expected one of {list(PRESETS)}, got {name!r}")
    return PRESETS[name].levels()


def parse_shape(text: str) -> Level:
    """``"N,C_in,C_out,H,W,h,w"`` -> a Level named after its shape."""
    parts = text.split(",")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 7 or min(values) < 1:
        raise ValueError(
            f"--shape: expected 7 positive integers N,C_in,C_out,H,W,h,w, got {text!r}")
    n, c_in, c_out, h_out, w_out, h_top, w_top = values
    return Level(f"{c_in}x{h_out}x{w_out}", n, c_in, c_out, (h_out, w_out), (h_top, w_top))


def make_inputs(level: Level, dtype: torch.dtype, channels_last: bool,
                device: str | torch.device, requires_grad: bool = False,
                seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Unit-scale ``lateral, weight (C_out, C_in, 1, 1), bias, top`` (weight / sqrt(C_in) keeps
    the conv output at unit scale, so absolute errors read as relative ones)."""
    g = torch.Generator().manual_seed(seed)
    lateral = torch.randn(level.n, level.c_in, *level.out_hw, generator=g)
    weight = torch.randn(level.c_out, level.c_in, 1, 1, generator=g) / math.sqrt(level.c_in)
    bias = torch.randn(level.c_out, generator=g)
    top = torch.randn(level.n, level.c_out, *level.top_hw, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    lateral, top = (t.contiguous(memory_format=fmt) for t in (lateral, top))
    return tuple(  # type: ignore[return-value]
        t.to(device=device, dtype=dtype).requires_grad_(requires_grad)
        for t in (lateral, weight, bias, top)
    )


def backend_impls(device: str, dtype: torch.dtype, only: Sequence[str] | None = None) -> list[str]:
    """Impl names of the fpn_kernels backends that can run ``dtype`` on ``device`` here, in
    preference order (``only``: restrict to these backend names). Only where ``backend="auto"``
    could pick them: never the Triton interpreter (TRITON_INTERPRET=1 on CPU), a correctness
    tool orders of magnitude slower than a real kernel."""
    names = []
    for name in backends.available_backends():
        if only is not None and name not in only:
            continue
        if not backends.BACKENDS[name].not_supported_reasons(torch.device(device), dtype,
                                                             auto=True):
            names.append(OP_EAGER if name == "eager" else name)
    return names


def backend_of(impl: str) -> str | None:
    """The fpn_kernels backend behind an impl name, None for the eager/compile baselines."""
    if impl in (EAGER, COMPILE, CONV_ONLY):
        return None
    return "eager" if impl == OP_EAGER else impl


def is_fused(impl: str) -> bool:
    """Whether the impl writes the output in one pass (the fused bytes model applies)."""
    return backend_of(impl) not in (None, "eager")


def compile_options(device: str) -> dict:
    return {"mode": "max-autotune"} if device == "cuda" else {}


def make_impl(name: str, device: str, compiler: str = "inductor") -> Impl:
    """The function behind an impl name. ``compile`` starts from a fresh dynamo cache: every
    case is compiled for its own shapes, and torch.compile's recompile limit (8 per function)
    can never silently drop a later case to eager."""
    if name == EAGER:
        return upsample_add_conv1x1_reference
    if name == CONV_ONLY:
        return lambda lateral, weight, bias, top: torch.nn.functional.conv2d(lateral, weight, bias)
    if name == COMPILE:
        torch._dynamo.reset()
        return torch.compile(upsample_add_conv1x1_reference, dynamic=False, backend=compiler,
                             **(compile_options(device) if compiler == "inductor" else {}))
    backend = backend_of(name)
    assert backend is not None  # None only for the baselines, returned above

    def fused(lateral: Tensor, weight: Tensor, bias: Tensor | None, top: Tensor) -> Tensor:
        return upsample_add_conv1x1(lateral, weight, bias, top, backend=backend)

    return fused


def step(impl: Impl, inputs: Sequence[Tensor], direction: str,
         grad_out: Tensor | None = None) -> Callable[[], Tensor]:
    """A zero-argument call of ``impl`` on ``inputs``: the forward, or for "fwd+bwd" the forward
    then the backward of ``grad_out`` into the inputs' ``.grad`` (cleared first, so every call
    does the same work)."""
    if direction == "fwd":
        return lambda: impl(*inputs)
    if direction != "fwd+bwd":
        raise ValueError(f"direction: expected one of {DIRECTIONS}, got {direction!r}")
    if grad_out is None:
        raise ValueError("direction 'fwd+bwd' needs a grad_out")

    def forward_backward() -> Tensor:
        for t in inputs:
            t.grad = None
        out = impl(*inputs)
        out.backward(grad_out)
        return out

    return forward_backward


def make_grad_out(level: Level, dtype: torch.dtype, channels_last: bool,
                  device: str | torch.device, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    grad = torch.randn(level.n, level.c_out, *level.out_hw, generator=g)
    return grad.to(device=device, dtype=dtype).contiguous(memory_format=fmt)


def max_abs_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
