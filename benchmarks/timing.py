"""The one timing utility every benchmark uses.

`compare` is how a benchmark pits nanops against its baseline: paired, interleaved rounds (each
round times every variant once, in an order that alternates, so a drift of the machine hits all
alike), each round a batch of back-to-back calls between one pair of CUDA events (GPU time, not
the host's time per call: the host queues the calls ahead of the GPU), or a CUDA graph of them
replayed (no host time at all). `host_us` times the host's side of a call apart. `measure`
(one call per sample, events around it) stays for work that must be reset between calls.
Inputs are rotated over several copies so that a small case is not flattered by a warm cache.
"""
from __future__ import annotations

import itertools
import math
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


def rotating(fn: Callable[..., object], inputs: Sequence[tuple]) -> Callable[[], object]:
    """A zero-argument call of fn over the inputs in turn (compare's variants take none)."""
    cycle = itertools.cycle(inputs)
    return lambda: fn(*next(cycle))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Batch:
    """`calls` back-to-back calls of one variant, timed as a whole: by a pair of CUDA events
    (or a CUDA graph of the calls, replayed) on a GPU, by the wall clock on a CPU."""

    def __init__(self, fn: Callable[[], object], device: torch.device, calls: int, graph: bool):
        self.fn, self.device, self.calls, self.graph = fn, device, calls, None
        if graph and device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # warm-up off the capture, as torch.cuda.graphs asks
                for _ in range(2):
                    fn()
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                for _ in range(calls):
                    fn()

    def run(self) -> float:
        """Milliseconds per call."""
        if self.device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            if self.graph is not None:
                self.graph.replay()
            else:
                for _ in range(self.calls):
                    self.fn()
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / self.calls
        t0 = time.perf_counter()
        for _ in range(self.calls):
            self.fn()
        return (time.perf_counter() - t0) * 1e3 / self.calls


def _calls_for(fn: Callable[[], object], device: torch.device, batch_ms: float) -> int:
    """Calls per batch so that a batch takes about batch_ms (at least one, at most 200)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = (time.perf_counter() - t0) * 1e3
    return max(1, min(200, math.ceil(batch_ms / max(one, 1e-3))))


def compare(
    fns: dict[str, Callable[[], object]],
    device: torch.device,
    *,
    graph: bool = False,
    warmup: int = 3,
    min_rounds: int = 10,
    min_seconds: float = 1.0,
    max_rounds: int = 200,
    batch_ms: float = 2.0,
) -> dict[str, Timing]:
    """Times zero-argument variants (`rotating` makes one of a function and its inputs) in paired,
    interleaved rounds; per variant, milliseconds per call and the per-round samples that
    `paired_ratio` pairs. graph=True replays a CUDA graph of each batch (the variants must be
    capturable: no host sync, no CPU tensors); on the CPU it changes nothing."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    calls = {name: _calls_for(fn, device, batch_ms) for name, fn in fns.items()}
    if len(set(calls.values())) > 1:  # one batch size for all: the same share of launch gaps
        calls = dict.fromkeys(calls, min(calls.values()))
    batches = {name: _Batch(fn, device, calls[name], graph) for name, fn in fns.items()}
    _sync(device)
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < min_seconds * TIME_SCALE):
        order = names if rounds % 2 == 0 else names[::-1]
        for name in order:
            samples[name].append(batches[name].run())
        rounds += 1
    return {name: Timing(statistics.median(v), _quantile(v, 0.2), _quantile(v, 0.8), len(v), tuple(v))
            for name, v in samples.items()}


def host_us(fn: Callable[[], object], device: torch.device, *, calls: int = 50, repeats: int = 15) -> float:
    """Median host microseconds to issue one call (the wall clock around `calls` calls, no sync
    inside; on a CPU that is the whole call). The GPU work queued meanwhile is drained untimed."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) * 1e6 / calls)
    _sync(device)
    return statistics.median(times)
