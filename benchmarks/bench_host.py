"""Per-call host overhead of nanops' entry points (timing.host_us: the wall clock around 100
calls with no sync inside, so on a GPU the host's side alone): lists of tiny tensors (one element each), so
that the time is what Python and C++ spend around the kernels (argument checks, grouping,
dispatch, launches), not the kernels themselves.

Cases: 182 tensors (yolov5s-transformer's grad count) and 1000 tensors, float32, on the bench
device. Baselines: torch's own call for the same job (its clip_grad_norm_(foreach=True); its
fused `_amp_foreach_non_finite_check_and_unscale_` for the NaN/Inf checks). On a GPU these rows
say how far a step is from being launch-bound; on the CPU they measure the wrappers. And one
stable_softmax call on a (2, 8) float32 tensor, with and without grad, against torch.softmax.
"""
from __future__ import annotations

import sys

import torch

import nanops
from common import bench_device, report, row
from timing import Timing, host_us


def host_timing(fn, device) -> Timing:
    """Host time per call as a Timing (host_us: the wall clock around a batch of calls, no sync
    inside; on a CPU the whole call)."""
    samples = [host_us(fn, device, calls=100, repeats=1) for _ in range(15)]
    ordered = sorted(samples)
    return Timing(ordered[len(ordered) // 2] / 1e3, ordered[3] / 1e3, ordered[11] / 1e3, len(samples))

SIZES = (182, 1000)


def _params(n: int, device: torch.device) -> list[torch.nn.Parameter]:
    params = []
    for i in range(n):
        p = torch.nn.Parameter(torch.zeros(1, device=device))
        p.grad = torch.full((1,), 1e-3 * (1 + i % 7), device=device)  # norm far below max_norm: no scaling
        params.append(p)
    return params


def main(argv=None) -> list[dict]:
    device = bench_device()
    rows = []
    for n in SIZES:
        params = _params(n, device)
        grads = [p.grad for p in params]
        found_inf = torch.zeros(1, device=device)
        inv_scale = torch.ones(1, device=device)

        def torch_check():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)

        base_check = host_timing(torch_check, device)
        rows.append(row(f"nonfinite_counts, {n} tiny tensors", "torch._amp_foreach_non_finite_check",
                        base_check, host_timing(lambda: nanops.nonfinite_counts(grads), device)))
        rows.append(row(f"all_finite, {n} tiny tensors", "torch._amp_foreach_non_finite_check",
                        base_check, host_timing(lambda: nanops.all_finite(grads), device)))
        base_clip = host_timing(lambda: torch.nn.utils.clip_grad_norm_(params, 10.0, foreach=True), device)
        rows.append(row(f"clip_grad_norm_, {n} tiny tensors", "torch clip_grad_norm_(foreach=True)", base_clip,
                        host_timing(lambda: nanops.clip_grad_norm_(params, 10.0), device)))
        rows.append(row(f"clip_grad_norm_ + AMP unscale, {n} tiny tensors", "torch clip_grad_norm_(foreach=True)",
                        base_clip, host_timing(lambda: nanops.clip_grad_norm_(params, 10.0, inv_scale=inv_scale,
                                                                              found_inf=found_inf), device)))
    for needs_grad in (False, True):
        x = torch.randn(2, 8, device=device, requires_grad=needs_grad)
        what = "requires grad" if needs_grad else "no grad"
        rows.append(row(f"stable_softmax, (2, 8), {what}", "torch.softmax",
                        host_timing(lambda: torch.softmax(x, -1), device),
                        host_timing(lambda: nanops.stable_softmax(x), device)))
    return report("host", f"host overhead per call on {device} (tiny tensors)", device, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
