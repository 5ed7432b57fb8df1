"""nanops.clip_grad_norm_ vs torch's clip_grad_norm_(foreach=True) and vs the AMP sequence
(GradScaler.unscale_'s fused check-and-unscale, then clip).

Cases: the yolov5s-transformer parameter list; 1000 small tensors.
Targets (issue 4): CUDA >= 2x torch foreach with zero host syncs; CPU >= 1.5x.
Every timed call finds grads with a norm far above max_norm, so every call really scales: the
grads are restored from a pristine copy, untimed, after each call, and enough copies rotate
that a restored set has left the cache before it is clipped again.
"""
from __future__ import annotations

import sys

import torch

import nanops
from common import bench_device, report, row, yolov5_transformer_grads
from timing import measure, rotation_count

MAX_NORM = 1.0


def as_params(grads):
    params = []
    for g in grads:
        p = torch.nn.Parameter(torch.empty_like(g))
        p.grad = g.clone()
        params.append(p)
    return params


def restore(params, found_inf, inv_scale, pristine):
    torch._foreach_copy_([p.grad for p in params], pristine)


def torch_clip(params, found_inf, inv_scale, pristine):
    return torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)


def torch_unscale_then_clip(params, found_inf, inv_scale, pristine):
    grads = [p.grad for p in params]
    torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
    return torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)


def torch_mul_then_clip(params, found_inf, inv_scale, pristine):
    """What is left to a torch user whose grads the fused unscale refuses (bfloat16 on CUDA):
    a foreach multiply, then the clip; the clip's norm is the inf check."""
    grads = [p.grad for p in params]
    torch._foreach_mul_(grads, inv_scale)
    norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
    found_inf.copy_(~torch.isfinite(norm))
    return norm


def nanops_clip(params, found_inf, inv_scale, pristine):
    return nanops.clip_grad_norm_(params, MAX_NORM)


def nanops_unscale_clip(params, found_inf, inv_scale, pristine):
    return nanops.clip_grad_norm_(params, MAX_NORM, inv_scale=inv_scale, found_inf=found_inf)


def main(argv=None) -> list[dict]:
    device = bench_device()
    rows = []
    lists = [
        ("yolov5s-transformer params (182)", yolov5_transformer_grads(device)),
        ("1000 small tensors", [torch.randn(64 + i % 200, device=device) for i in range(1000)]),
    ]
    if device.type == "cuda":
        # 1e9 bfloat16 parameters (a 1B-parameter model's grads, 2 GB) in 100 tensors.
        lists.append(("1e9 bf16 params", [torch.randn(10_000_000, device=device, dtype=torch.bfloat16)
                                           for _ in range(100)]))
    for name, grads in lists:
        nbytes = sum(g.numel() * g.element_size() for g in grads)
        found_inf = torch.zeros(1, device=device)
        # 1.0 keeps magnitudes stable over repeated calls; the work done is that of any scale.
        inv_scale = torch.ones(1, device=device)
        pristine = [g * 1e3 for g in grads]
        inputs = [(as_params(pristine), found_inf, inv_scale, pristine) for _ in range(rotation_count(nbytes))]
        ours = measure(nanops_clip, inputs, device, reset=restore)
        rows.append(row(name, "torch clip_grad_norm_(foreach=True)", measure(torch_clip, inputs, device, reset=restore),
                        ours, 3 * nbytes))
        ours_amp = measure(nanops_unscale_clip, inputs, device, reset=restore)
        try:
            base_amp = measure(torch_unscale_then_clip, inputs, device, reset=restore)
            rows.append(row(f"{name} +AMP unscale", "torch unscale_ + clip (foreach)", base_amp, ours_amp, 3 * nbytes))
        except (RuntimeError, NotImplementedError) as err:
            # torch's fused unscale has no bfloat16 kernel on CUDA (NotImplementedError there).
            print(f"  (torch fused unscale unavailable for {grads[0].dtype} on {device.type}: "
                  f"{err.__class__.__name__}; baseline: _foreach_mul_ + clip)")
            base_amp = measure(torch_mul_then_clip, inputs, device, reset=restore)
            rows.append(row(f"{name} +AMP unscale", "torch _foreach_mul_(inv_scale) + clip", base_amp, ours_amp,
                            3 * nbytes))
    return report("clip", f"clip_grad_norm_ on {device}", device, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
