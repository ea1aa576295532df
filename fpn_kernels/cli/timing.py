"""Timing: a stable median and its spread.

CPU: ``time.perf_counter`` around each call, the candidates of one case interleaved round-robin
(rotating the order every round) so that a burst of load on this shared machine hits all of them
alike; at least ``min_repeats`` rounds, then more while the case's time budget lasts (so short
cases get many samples), calls batched per sample when one call is shorter than ``min_sample_s``.
GPU: ``triton.testing.do_bench`` (which flushes L2 between calls) with quantiles
[0.5, 0.2, 0.8], or CUDA events when Triton is missing.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

NOISY_SPREAD = 0.10  # (p80 - p20) / median above this is flagged as noisy


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int | None  # None: do_bench chose the count

    @property
    def spread(self) -> float:
        """The p20-p80 range relative to the median."""
        return (self.p80_ms - self.p20_ms) / self.median_ms if self.median_ms > 0 else 0.0

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    @classmethod
    def from_samples(cls, samples_ms: list[float]) -> Timing:
        p50, p20, p80 = np.percentile(np.asarray(samples_ms), [50, 20, 80])
        return cls(float(p50), float(p20), float(p80), len(samples_ms))

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "repeats": self.repeats, "spread": self.spread, "noisy": self.noisy}


@dataclass(frozen=True)
class TimingPolicy:
    min_repeats: int = 5
    max_repeats: int = 200
    budget_s: float = 2.0  # per case, beyond the min_repeats rounds
    warmup: int = 1
    min_sample_s: float = 2e-3  # batch calls of shorter functions into one sample


def time_round_robin(fns: Mapping[str, Callable[[], object]],
                     policy: TimingPolicy) -> dict[str, Timing]:
    """CPU wall-clock timing of every function in ``fns``, interleaved. Warm-up calls (at least
    one, which also sizes the batches) are not timed."""
    names = list(fns)
    per_call_s = {}
    for name in names:
        for _ in range(max(1, policy.warmup)):
            start = time.perf_counter()
            fns[name]()
            per_call_s[name] = time.perf_counter() - start
    batch = {n: max(1, math.ceil(policy.min_sample_s / max(per_call_s[n], 1e-9))) for n in names}
    samples: dict[str, list[float]] = {n: [] for n in names}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection inside one sample is noise, not the function's cost
    try:
        started = time.perf_counter()
        for round_index in range(policy.max_repeats):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                fn, calls = fns[name], batch[name]
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - start) * 1e3 / calls)
            done = round_index + 1
            if done >= policy.min_repeats and time.perf_counter() - started >= policy.budget_s:
                break
    finally:
        if gc_was_enabled:
            gc.enable()
    return {n: Timing.from_samples(samples[n]) for n in names}


def time_cuda(fn: Callable[[], object], policy: TimingPolicy) -> Timing:
    """GPU time of ``fn``: triton's do_bench when Triton is installed, else CUDA events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        # do_bench sizes its repeat count to `rep` milliseconds of GPU time.
        p50, p20, p80 = do_bench(fn, warmup=25, rep=max(100, int(policy.budget_s * 100)),
                                 quantiles=[0.5, 0.2, 0.8])
        return Timing(float(p50), float(p20), float(p80), None)
    for _ in range(max(policy.warmup, 3)):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(max(policy.min_repeats, 25)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end))
    return Timing.from_samples(samples)


def time_all(fns: Mapping[str, Callable[[], object]], policy: TimingPolicy,
             device: str) -> dict[str, Timing]:
    """Time every function of one case with the right clock for ``device``."""
    if device == "cuda":
        return {name: time_cuda(fn, policy) for name, fn in fns.items()}
    return time_round_robin(fns, policy)
