"""Cost of nanops.watch vs torch.autograd.detect_anomaly on a yolov5s-transformer step.

Target (issue 6): watch overhead <= 5% of step time on GPU; detect_anomaly's slowdown reported.
"""
from __future__ import annotations

import sys

import torch

import nanops
from common import bench_device, report, row
from nanops.yolov5 import build_transformer_model
from timing import measure


def main(argv=None) -> list[dict]:
    device = bench_device()
    model = build_transformer_model().to(device).train()
    inputs = [(torch.randn(2, 3, 256, 256, device=device),)]

    def step(images):
        sum(o.float().square().mean() for o in model(images)).backward()
        model.zero_grad(set_to_none=True)

    def anomaly_step(images):
        with torch.autograd.detect_anomaly(check_nan=True):
            step(images)

    plain = measure(step, inputs, device, min_runs=5)
    watcher = nanops.watch(model)

    def watched_step(images):
        step(images)
        watcher.check()

    watched = measure(watched_step, inputs, device, min_runs=5)
    watcher.remove()
    anomaly = measure(anomaly_step, inputs, device, min_runs=5)
    rows = [
        row("train step, watch on (vs no checks)", "no checks", plain, watched,
            overhead_pct=100 * (watched.median_ms / plain.median_ms - 1)),
        row("train step, watch (vs detect_anomaly)", "torch.autograd.detect_anomaly", anomaly, watched,
            anomaly_overhead_pct=100 * (anomaly.median_ms / plain.median_ms - 1)),
    ]
    report("watch", f"first-NaN locator cost on {device}", device, rows)
    print(f"watch overhead {rows[0]['overhead_pct']:.1f}%, detect_anomaly overhead {rows[1]['anomaly_overhead_pct']:.1f}%")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
