"""yolov5's TransformerLayer under nanops (nanops.patch: the fused stable attention) vs as it comes.

Layer fwd+bwd at the C3TR shape (L = 400 and 1600, N = 16 on CUDA / 4 on CPU, C = 256, 4 heads),
float32, and under float16 autocast on CUDA. The three variants run in the same paired rounds
(timing.compare, GPU time):
  * yolov5's layer as it is (attention with need_weights=True: the L x L logits in 16 bits);
  * the same layer calling attention with need_weights=False (torch's scaled_dot_product_attention,
    the one-line fix users are told to try);
  * nanops: the same layer, nanops.patch'ed (what `nanops train` runs).
Targets: fp16 autocast >= 1.3x (L=400) / >= 2x (L=1600) yolov5's layer and >= 0.95x the SDPA
layer; CPU float32 >= 1.5x at L=1600, parity at L=400. Each row names the attention kernel that
ran on each side (from the profiler). The whole training step is bench_step.py.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import sys

import torch

import nanops
from common import bench_device, report, row
from nanops.yolov5.shims import import_yolov5_common
from timing import compare, rotating

TARGETS = {("fp16 autocast", 400): 1.3, ("fp16 autocast", 1600): 2.0, ("float32", 1600): 1.5, ("float32", 400): 1.0}


def attention_kernels(fn) -> str:
    """The attention operators one call of fn runs (e.g. aten::_scaled_dot_product_flash_attention)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    names = sorted({e.key.removeprefix("aten::") for e in prof.key_averages()
                    if e.key.startswith(("aten::_scaled_dot_product_", "aten::_flash_attention", "aten::_efficient",
                                         "aten::_cudnn_attention", "nanops::stable_softmax"))
                    or e.key in ("aten::softmax", "aten::_softmax")})
    return ", ".join(n for n in names if "backward" not in n) or "none"


def layer_rows(device) -> list[dict]:
    common = import_yolov5_common()
    rows = []
    batch = 16 if device.type == "cuda" else 4
    modes = [("float32", contextlib.nullcontext)]
    if device.type == "cuda":
        modes.append(("fp16 autocast", lambda: torch.autocast("cuda", dtype=torch.float16)))
    for length in (400, 1600):
        torch.manual_seed(0)
        ref = common.TransformerLayer(256, 4).to(device)
        sdpa = copy.deepcopy(ref)
        sdpa.ma.forward = functools.partial(type(sdpa.ma).forward, sdpa.ma, need_weights=False)
        ours = copy.deepcopy(ref)
        nanops.patch(ours)
        for mode, ctx in modes:
            inputs = [(torch.randn(length, batch, 256, device=device, requires_grad=True),) for _ in range(2)]

            def step(layer):
                def run(x):
                    x.grad = None
                    with ctx():
                        y = layer(x)
                    y.float().sum().backward()
                return rotating(run, inputs)

            variants = {"yolov5": step(ref), "sdpa": step(sdpa), "nanops": step(ours)}
            kernels = {name: attention_kernels(fn) for name, fn in variants.items()}
            times = compare(variants, device, min_rounds=6 if device.type == "cpu" else 20)
            case = f"layer fwd+bwd L={length} N={batch} {mode}"
            target = TARGETS.get((mode, length))
            rows.append(row(case, "yolov5 TransformerLayer", times["yolov5"], times["nanops"],
                            baseline_kernel=kernels["yolov5"], nanops_kernel=kernels["nanops"], target=target))
            rows.append(row(case, "same layer, need_weights=False (SDPA)", times["sdpa"], times["nanops"],
                            baseline_kernel=kernels["sdpa"], nanops_kernel=kernels["nanops"],
                            target=0.95 if mode != "float32" else None))
            print(f"  {case}: kernels yolov5 [{kernels['yolov5']}], SDPA layer [{kernels['sdpa']}], "
                  f"nanops [{kernels['nanops']}]", flush=True)
    return rows


def main(argv=None) -> list[dict]:
    device = bench_device()
    rows = layer_rows(device)
    return report("transformer", f"TransformerLayer on {device}", device, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
