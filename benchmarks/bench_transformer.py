"""nanops TransformerLayer vs yolov5's, and one whole training step, patched vs plain.

Layer: fwd+bwd at the C3TR shape (L = 400 and 1600, N = 16 on CUDA / 4 on CPU, C = 256, 4 heads),
float32, and under float16 autocast on CUDA. Step: yolov5s-transformer forward + loss + backward +
optimizer step, plain (torch clip + step) vs nanops (patched + guarded_step + watch).
Targets (issue 6): layer >= 1.0x yolov5's; whole-step overhead <= 5% on GPU (CPU reported too).
"""
from __future__ import annotations

import contextlib
import copy
import sys

import torch

import nanops
from common import bench_device, report, row
from nanops._yolov5_env import build_transformer_model, import_yolov5_common
from nanops.yolov5 import patch
from timing import measure


def layer_rows(device) -> list[dict]:
    common = import_yolov5_common()
    rows = []
    batch = 16 if device.type == "cuda" else 4
    modes = [("float32", contextlib.nullcontext)]
    if device.type == "cuda":
        modes.append(("fp16 autocast", lambda: torch.autocast("cuda", dtype=torch.float16)))
    for length in (400, 1600):
        ref = common.TransformerLayer(256, 4).to(device)
        ours = nanops.nn.TransformerLayer(256, 4).to(device)
        ours.load_state_dict(ref.state_dict())
        for mode, ctx in modes:
            inputs = [(torch.randn(length, batch, 256, device=device, requires_grad=True),) for _ in range(2)]

            def step(layer):
                def run(x):
                    with ctx():
                        y = layer(x)
                    y.float().sum().backward()
                return run

            rows.append(row(f"layer fwd+bwd L={length} N={batch} {mode}", "yolov5 TransformerLayer",
                            measure(step(ref), inputs, device), measure(step(ours), inputs, device)))
    return rows


def step_rows(device) -> list[dict]:
    base = build_transformer_model().to(device).train()
    plain, ours = base, copy.deepcopy(base)
    patch(ours)
    x = [(torch.randn(2, 3, 256, 256, device=device),)]

    def plain_step(model, opt):
        def run(images):
            sum(o.float().square().mean() for o in model(images)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            opt.step()
            opt.zero_grad()
        return run

    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-6)
    ours_opt = torch.optim.SGD(ours.parameters(), lr=1e-6)
    watcher = nanops.watch(ours)

    def nanops_step(images):
        sum(o.float().square().mean() for o in ours(images)).backward()
        nanops.guarded_step(ours_opt, None, max_norm=10.0)
        watcher.check()

    t_plain = measure(plain_step(plain, plain_opt), x, device, min_runs=5)
    t_ours = measure(nanops_step, x, device, min_runs=5)
    watcher.remove()
    return [row("yolov5s-transformer train step 2x256px", "plain yolov5 step", t_plain, t_ours,
                overhead_pct=100 * (t_ours.median_ms / t_plain.median_ms - 1))]


def main(argv=None) -> list[dict]:
    device = bench_device()
    rows = layer_rows(device) + step_rows(device)
    return report("transformer", f"TransformerLayer and training step on {device}", device, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
