"""nonfinite_counts vs what users write instead.

Cases: (a) the gradient list of yolov5s-transformer, (b) one 256 MB float32 tensor.
Baselines: a per-tensor torch.isfinite(t).all() loop; torch's fused internal
torch._amp_foreach_non_finite_check_and_unscale_ (inv_scale = 1) where the device has it.
Targets: all_finite / nonfinite_counts on the yolov5 list >= 1.2x torch's fused check per call
(CUDA, where it is host-bound). Earlier: CPU >= 2x the loop on the yolov5 list; CUDA >= 5x the loop, no slower than
torch's fused internal, >= 80% of memory read bandwidth on the big tensor.
"""
from __future__ import annotations

import sys

import torch

import nanops
from common import bench_device, report, row, yolov5_transformer_grads
from timing import compare, host_us, rotating, rotation_count


def per_tensor_loop(tensors):
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def torch_fused_check(tensors, found_inf, inv_scale):
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found_inf, inv_scale)
    return found_inf


def nanops_check(tensors):
    return nanops.all_finite(tensors)


def nanops_counts(tensors):
    return nanops.nonfinite_counts(tensors)


def read_ceiling_gbps(tensor: torch.Tensor, device: torch.device) -> float:
    """The device's read bandwidth as torch's own amax reduction achieves it (reads every byte
    once, writes one number): what '>= 90% of read bandwidth' is measured against."""
    timing = compare({"amax": lambda: torch.amax(tensor)}, device)["amax"]
    return tensor.numel() * tensor.element_size() / (timing.median_ms * 1e-3) / 1e9


def cases(device):
    grads = yolov5_transformer_grads(device)
    big = torch.randn(64 * 1024 * 1024, device=device)  # 256 MB of float32
    return [("yolov5s-transformer grads (182 tensors)", grads), ("one 256 MB float32 tensor", [big])]


def main(argv=None) -> list[dict]:
    """Each row's two sides run in the same paired rounds (timing.compare: back-to-back calls
    between one event pair, so a host-bound call shows its host time, as it would in training);
    host microseconds per call apart on CUDA."""
    device = bench_device()
    cuda = device.type == "cuda"
    rows = []
    for name, tensors in cases(device):
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        copies = rotation_count(nbytes) if nbytes < (256 << 20) else 1
        inputs = [([t.clone() for t in tensors],) for _ in range(copies)]
        ceiling = read_ceiling_gbps(tensors[0], device) if len(tensors) == 1 else None
        extra = {"read_ceiling_gbps": ceiling} if ceiling else {}
        found_inf = torch.zeros(1, device=device)
        inv_scale = torch.ones(1, device=device)
        variants = {
            "all_finite": rotating(nanops_check, inputs),
            "nonfinite_counts": rotating(nanops_counts, inputs),
            "loop": rotating(per_tensor_loop, inputs),
            "fused": rotating(lambda ts: torch_fused_check(ts, found_inf, inv_scale), inputs),
        }
        times = compare(variants, device)
        host = {k: host_us(fn, device) for k, fn in variants.items()} if cuda else {}

        def add(case, baseline, base, ours):
            more = dict(extra)
            if host:
                more.update(baseline_host_us=host[base], nanops_host_us=host[ours])
            rows.append(row(case, baseline, times[base], times[ours], nbytes, **more))

        add(name, "per-tensor isfinite().all() loop", "loop", "all_finite")
        add(f"{name}, nonfinite_counts", "per-tensor isfinite().all() loop", "loop", "nonfinite_counts")
        add(name, "torch._amp_foreach_non_finite_check", "fused", "all_finite")
        add(f"{name}, nonfinite_counts", "torch._amp_foreach_non_finite_check", "fused", "nonfinite_counts")
    return report("nonfinite", f"nonfinite_counts on {device}", device, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
