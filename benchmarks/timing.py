"""The one timing utility every benchmark uses.

Median of repeated runs after warm-up; CUDA timed with events; inputs rotated over several
copies so that a small case is not flattered by a warm cache.
"""
from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    runs: int
    samples: tuple[float, ...] = ()  # per-run times in ms (interleaved runs: round by round)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("samples")
        return out


# NANOPS_BENCH_TIME_SCALE=0.3 shortens every minimum measuring time (the run counts stay): a GPU
# lease of minutes times with CUDA events, which need far fewer seconds than a CPU's wall clock.
TIME_SCALE = float(os.environ.get("NANOPS_BENCH_TIME_SCALE", "1"))


def paired_ratio(ours: Timing, base: Timing) -> float:
    """Median over rounds of ours/base, each round's two runs taken side by side: steadier than a
    ratio of medians on a machine whose speed drifts."""
    return statistics.median(a / b for a, b in zip(ours.samples, base.samples, strict=True))


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(
    fn: Callable[..., object],
    inputs: Sequence[tuple],
    device: torch.device,
    *,
    warmup: int = 3,
    min_runs: int = 10,
    min_seconds: float = 0.5,
    max_runs: int = 200,
    reset: Callable[..., object] | None = None,
) -> Timing:
    """Times fn(*inputs[i % len(inputs)]) and returns per-call statistics in milliseconds.

    reset(*args), when given, runs untimed after every call to restore inputs that fn changes in
    place (a clip must find grads above max_norm every time, or it has nothing to scale).
    """
    cuda = device.type == "cuda"
    for i in range(warmup):
        fn(*inputs[i % len(inputs)])
        if reset is not None:
            reset(*inputs[i % len(inputs)])
    if cuda:
        torch.cuda.synchronize(device)
    times: list[float] = []
    start_all = time.perf_counter()
    i = 0
    while i < max_runs and (i < min_runs or time.perf_counter() - start_all < min_seconds * TIME_SCALE):
        args = inputs[i % len(inputs)]
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(*args)
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - t0) * 1e3)
        if reset is not None:
            reset(*args)
        i += 1
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times))


def measure_interleaved(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    warmup: int = 2,
    min_rounds: int = 8,
    min_seconds: float = 20.0,
    max_rounds: int = 60,
) -> dict[str, Timing]:
    """Times several whole steps in rounds, each round running every fn once, so that a drift of
    the machine (other jobs, clocks) hits all of them alike; per-fn statistics in milliseconds."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start_all = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start_all < min_seconds * TIME_SCALE):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if cuda:
                torch.cuda.synchronize(device)
            times[name].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return {name: Timing(statistics.median(v), _quantile(v, 0.2), _quantile(v, 0.8), len(v), tuple(v))
            for name, v in times.items()}


def rotation_count(bytes_per_input: int, cache_bytes: int = 64 << 20) -> int:
    """How many input copies to rotate so that together they exceed the last-level cache."""
    return max(1, min(8, -(-2 * cache_bytes // max(bytes_per_input, 1))))
