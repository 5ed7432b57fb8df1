"""What the PyTorch fallback costs: each op through nanops' kernels vs through nanops/_fallback.py
(what runs where the compiled library cannot load, or has no kernels for the device).

speedup = fallback time / kernel time (> 1: the kernels are faster), same inputs, paired rounds.
Cases: stable_softmax at the C3TR shape (16, 4, 400, 400); the NaN/Inf check and the clip over
yolov5s-transformer's 182 gradients.
"""
from __future__ import annotations

import sys

import torch

from common import bench_device, report, row, yolov5_transformer_grads
from nanops import _fallback
from timing import compare


def main(argv=None) -> list[dict]:
    device = bench_device()
    rows = []
    x = torch.randn(16, 4, 400, 400, device=device)
    times = compare({"fallback": lambda: _fallback.stable_softmax(x, -1, 0.125, None),
                     "kernel": lambda: torch.ops.nanops.stable_softmax.default(x, -1, 0.125, None)}, device)
    rows.append(row("stable_softmax fwd (16, 4, 400, 400) float32", "nanops' PyTorch fallback", times["fallback"],
                    times["kernel"]))
    grads = yolov5_transformer_grads(device)
    times = compare({"fallback": lambda: _fallback.all_finite(grads),
                     "kernel": lambda: torch.ops.nanops.all_finite.default(grads)}, device)
    rows.append(row("all_finite, yolov5s-transformer grads (182)", "nanops' PyTorch fallback", times["fallback"],
                    times["kernel"]))
    times = compare({"fallback": lambda: _fallback.clip_grad_norm_(grads, 1e9, 2.0, None, None, False),
                     "kernel": lambda: torch.ops.nanops.clip_grad_norm_.default(grads, 1e9, 2.0, None, None, False)},
                    device)
    rows.append(row("clip_grad_norm_ (norm only), yolov5s-transformer grads", "nanops' PyTorch fallback",
                    times["fallback"], times["kernel"]))
    return report("fallback", f"kernels vs the PyTorch fallback on {device}", device, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
