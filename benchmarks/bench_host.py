"""Per-call host overhead of nanops' entry points: lists of tiny tensors (one element each), so
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
from timing import measure

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
        inputs = [()]
        kw = dict(min_runs=200, min_seconds=1.0, max_runs=4000, warmup=20)

        def torch_check():
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)

        base_check = measure(torch_check, inputs, device, **kw)
        rows.append(row(f"nonfinite_counts, {n} tiny tensors", "torch._amp_foreach_non_finite_check",
                        base_check, measure(lambda: nanops.nonfinite_counts(grads), inputs, device, **kw)))
        rows.append(row(f"all_finite, {n} tiny tensors", "torch._amp_foreach_non_finite_check",
                        base_check, measure(lambda: nanops.all_finite(grads), inputs, device, **kw)))
        base_clip = measure(lambda: torch.nn.utils.clip_grad_norm_(params, 10.0, foreach=True), inputs, device, **kw)
        rows.append(row(f"clip_grad_norm_, {n} tiny tensors", "torch clip_grad_norm_(foreach=True)", base_clip,
                        measure(lambda: nanops.clip_grad_norm_(params, 10.0), inputs, device, **kw)))
        rows.append(row(f"clip_grad_norm_ + AMP unscale, {n} tiny tensors", "torch clip_grad_norm_(foreach=True)",
                        base_clip, measure(lambda: nanops.clip_grad_norm_(params, 10.0, inv_scale=inv_scale,
                                                                         found_inf=found_inf), inputs, device, **kw)))
    kw = dict(min_runs=200, min_seconds=1.0, max_runs=4000, warmup=20)
    for needs_grad in (False, True):
        x = torch.randn(2, 8, device=device, requires_grad=needs_grad)
        what = "requires grad" if needs_grad else "no grad"
        rows.append(row(f"stable_softmax, (2, 8), {what}", "torch.softmax",
                        measure(lambda: torch.softmax(x, -1), [()], device, **kw),
                        measure(lambda: nanops.stable_softmax(x), [()], device, **kw)))
    return report("host", f"host overhead per call on {device} (tiny tensors)", device, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
