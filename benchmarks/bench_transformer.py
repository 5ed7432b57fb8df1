"""nanops TransformerLayer vs yolov5's.

Layer: fwd+bwd at the C3TR shape (L = 400 and 1600, N = 16 on CUDA / 4 on CPU, C = 256, 4 heads),
float32, and under float16 autocast on CUDA. Baselines: yolov5's layer as it is (attention with
need_weights=True: the unfused math path), and the same layer calling attention with
need_weights=False (torch's scaled_dot_product_attention, the one-line fix users are told to
try). Target: layer >= 1.0x yolov5's. The whole training step, plain vs protected, is
bench_step.py.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import sys

import torch

import nanops
from common import bench_device, report, row
from nanops.yolov5.env import import_yolov5_common
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
        sdpa = copy.deepcopy(ref)
        sdpa.ma.forward = functools.partial(type(sdpa.ma).forward, sdpa.ma, need_weights=False)
        for mode, ctx in modes:
            inputs = [(torch.randn(length, batch, 256, device=device, requires_grad=True),) for _ in range(2)]

            def step(layer):
                def run(x):
                    with ctx():
                        y = layer(x)
                    y.float().sum().backward()
                return run

            t_ours = measure(step(ours), inputs, device)
            rows.append(row(f"layer fwd+bwd L={length} N={batch} {mode}", "yolov5 TransformerLayer",
                            measure(step(ref), inputs, device), t_ours))
            rows.append(row(f"layer fwd+bwd L={length} N={batch} {mode}", "same layer, need_weights=False (SDPA)",
                            measure(step(sdpa), inputs, device), t_ours))
    return rows


def main(argv=None) -> list[dict]:
    device = bench_device()
    rows = layer_rows(device)
    return report("transformer", f"TransformerLayer on {device}", device, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
