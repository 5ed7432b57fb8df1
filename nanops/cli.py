"""The `nanops` command: demo, check."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def _cmd_demo(args) -> int:
    from .demo import run_demo

    plain, ours = run_demo(steps=args.steps, corrupt_step=args.corrupt_step, batch=args.batch,
                           image_size=args.img, plot=None if args.no_plot else Path(args.plot))
    # Success: nanops trained on past the corrupt batch (whose own loss is NaN by construction).
    recovered = all(math.isfinite(v) for v in ours.loss[args.corrupt_step + 1:])
    return 0 if recovered else 1


def _cmd_check(args) -> int:
    """One forward/backward of yolov5s-transformer with watch on: reports grads and the first non-finite module."""
    import torch

    import nanops
    from ._yolov5_env import build_transformer_model
    from .yolov5 import patch

    model = build_transformer_model()
    replaced = patch(model) if args.patch else 0
    x = torch.randn(args.batch, 3, args.img, args.img)
    if args.inject_nan:
        x[0, 0, 0, 0] = float("nan")
    with nanops.watch(model) as w:
        out = model(x)
        sum(o.float().square().mean() for o in out).backward()
        finding = w.check()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    counts = nanops.nonfinite_counts(grads)
    bad = int((counts.sum(1) > 0).sum())
    norm = nanops.get_total_norm(grads)
    print(f"yolov5s-transformer: {len(grads)} grad tensors, {sum(g.numel() for g in grads):,} values, "
          f"{replaced} TransformerLayer patched")
    print(f"grad norm {float(norm):.4g}; tensors with NaN/Inf: {bad} "
          f"(NaN {int(counts[:, 0].sum())}, +Inf {int(counts[:, 1].sum())}, -Inf {int(counts[:, 2].sum())})")
    print(f"first non-finite module: {finding}" if finding else "first non-finite module: none, all finite")
    return 1 if bad or finding else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanops", description="NaN-proof kernels for Transformer-YOLOv5 training")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="plain yolov5 training vs nanops on a run with a corrupt batch")
    demo.add_argument("--steps", type=int, default=24)
    demo.add_argument("--corrupt-step", type=int, default=6)
    demo.add_argument("--batch", type=int, default=2)
    demo.add_argument("--img", type=int, default=256)
    demo.add_argument("--plot", default="nanops_demo.png")
    demo.add_argument("--no-plot", action="store_true")
    demo.set_defaults(fn=_cmd_demo)
    check = sub.add_parser("check", help="check a yolov5s-transformer forward/backward for NaN/Inf")
    check.add_argument("--batch", type=int, default=2)
    check.add_argument("--img", type=int, default=256)
    check.add_argument("--patch", action="store_true", help="swap in nanops' TransformerLayer first")
    check.add_argument("--inject-nan", action="store_true", help="put a NaN in the input to see the report")
    check.set_defaults(fn=_cmd_check)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
