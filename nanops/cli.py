"""The `nanops` command: train, demo, check, doctor, bench."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path


def _demo_argument_error(args) -> str | None:
    if args.epochs < 1:
        return f"--epochs must be >= 1, got {args.epochs}"
    if args.batch < 1:
        return f"--batch must be >= 1, got {args.batch}"
    if args.images < 2:
        return f"--images must be >= 2, got {args.images}"
    if args.img < 32 or args.img % 32:
        return f"--img must be a multiple of 32 (yolov5's stride), got {args.img}"
    steps = args.epochs * math.ceil(args.images / args.batch)
    if not 0 <= args.corrupt_step < steps:
        return f"--corrupt-step must be in [0, {steps}) ({args.epochs} epochs of {math.ceil(args.images / args.batch)} batches), got {args.corrupt_step}"
    if not args.no_plot:
        folder = Path(args.plot).resolve().parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            return f"--plot: cannot write into {folder}"
    return None


def _cmd_demo(args) -> int:
    if (problem := _demo_argument_error(args)) is not None:
        print(f"nanops demo: {problem}", file=sys.stderr)
        return 2
    try:
        from .tools.demo import run_demo
    except ImportError as err:
        print(f"nanops demo: needs the yolov5 package ({err}); install it with: pip install 'nanops[yolov5]'",
              file=sys.stderr)
        return 2
    clean, plain, ours = run_demo(epochs=args.epochs, corrupt_step=args.corrupt_step, batch=args.batch,
                                  image_size=args.img, images=args.images,
                                  plot=None if args.no_plot else Path(args.plot))
    # Success: nanops kept the corrupt batch out and ended with finite weights and validation.
    recovered = ours.weights_finite and bool(ours.skipped) and all(math.isfinite(v) for v in ours.val_loss)
    return 0 if recovered else 1


def _cmd_check(args) -> int:
    """One forward/backward of yolov5s-transformer with watch on: reports grads and the first non-finite module."""
    if args.batch < 1:
        print(f"nanops check: --batch must be >= 1, got {args.batch}", file=sys.stderr)
        return 2
    if args.img < 32 or args.img % 32:
        print(f"nanops check: --img must be a multiple of 32 (yolov5's stride), got {args.img}", file=sys.stderr)
        return 2
    import torch

    import nanops
    from ._loader import describe
    from .yolov5 import build_transformer_model, patch

    for line in describe():
        print(line)

    try:
        model = build_transformer_model()
    except ImportError as err:
        print(f"nanops check: needs the yolov5 package ({err}); install it with: pip install 'nanops[yolov5]'",
              file=sys.stderr)
        return 2
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
          f"{replaced} attention module(s) patched")
    print(f"grad norm {float(norm):.4g}; tensors with NaN/Inf: {bad} "
          f"(NaN {int(counts[:, 0].sum())}, +Inf {int(counts[:, 1].sum())}, -Inf {int(counts[:, 2].sum())})")
    print(f"first non-finite module: {finding}" if finding else "first non-finite module: none, all finite")
    return 1 if bad or finding else 0


def _cmd_doctor(args) -> int:
    """Label and hyperparameter checks; exit 1 when anything is wrong, 2 when the input is unreadable."""
    from .tools.doctor import (DoctorError, check_fix_target, check_hyp, check_labels, find_label_files, load_hyp,
                         write_fixed_copies)

    if args.data is None and args.hyp is None:
        print("nanops doctor: give DATA (a yolov5 data yaml or a labels folder) and/or --hyp", file=sys.stderr)
        return 2
    if args.weights is not None and args.data is None:
        print("nanops doctor: --weights needs DATA (the model runs on a batch of its training images)",
              file=sys.stderr)
        return 2
    if args.img < 32 or args.img % 32 or args.batch < 1:
        print(f"nanops doctor: --img must be a multiple of 32 and --batch >= 1, got {args.img} and {args.batch}",
              file=sys.stderr)
        return 2
    wrong = 0
    try:
        if args.data is not None:
            files, nc = find_label_files(Path(args.data))
            if args.fix_to and files:
                check_fix_target(files, Path(args.fix_to))  # refused before anything is read or written
            report = check_labels(files, nc)
            for problem in report.problems[: args.max_report]:
                print(problem)
            if len(report.problems) > args.max_report:
                print(f"... {len(report.problems) - args.max_report} more")
            print(f"labels: {report.files} files, {report.rows} rows, {len(report.problems)} problem(s)"
                  + (f" (nc={nc})" if nc is not None else ""))
            wrong += len(report.problems)
            if args.fix_to:
                dropped, not_copied = write_fixed_copies(files, report, Path(args.fix_to))
                print(f"cleaned copies written to {args.fix_to} ({dropped} row(s) dropped; originals untouched)"
                      + (f"; {not_copied} unreadable file(s) not copied" if not_copied else ""))
        if args.hyp is not None:
            warnings = check_hyp(load_hyp(Path(args.hyp)), args.optimizer)
            for w in warnings:
                print(f"{args.hyp}: warning: {w}")
            print(f"hyp: {len(warnings)} warning(s) for optimizer {args.optimizer}")
            wrong += len(warnings)
        if args.weights is not None:
            wrong += _doctor_headroom(args)
    except DoctorError as err:
        print(f"nanops doctor: {err}", file=sys.stderr)
        return 2
    return 1 if wrong else 0


def _doctor_headroom(args) -> int:
    """--weights: each module's float16 headroom in one forward; returns the count within 8x of 65504."""
    import torch

    from .tools.model_headroom import image_batch, image_files, load_model, model_headroom

    model = load_model(Path(args.weights))
    images = image_batch(image_files(Path(args.data), args.batch), args.img)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    seen, tight = model_headroom(model, images, device)
    shown = [(f"{args.weights}: warning: ", h) for h in tight[: args.max_report]] or \
        [(f"{args.weights}: tightest: ", h) for h in seen[:5]]
    for prefix, h in shown:
        print(f"{prefix}{h} (|x| up to {h.fraction * 65504:.4g})")
    print(f"headroom: {len(seen)} float16 value(s) measured on {len(images)} image(s) at {args.img} px ({device}); "
          f"{len(tight)} within 8x of float16's 65504")
    return len(tight)


def _benchmarks_dir() -> Path | None:
    """The benchmark scripts: shipped in the wheel as `nanops_benchmarks` (the checkout's benchmarks/)."""
    import importlib.util

    spec = importlib.util.find_spec("nanops_benchmarks")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    checkout = Path(__file__).resolve().parents[1] / "benchmarks"
    return checkout if checkout.is_dir() else None


def _cmd_bench(args) -> int:
    """Runs the benchmark runner (benchmarks/run.py) with this package's kernels."""
    import runpy

    folder = _benchmarks_dir()
    if folder is None or not (folder / "run.py").exists():
        print("nanops bench: the benchmark scripts are missing from this installation", file=sys.stderr)
        return 2
    sys.argv = [str(folder / "run.py")] + (["--only", args.only] if args.only else []) + ["--out", args.out]
    try:
        runpy.run_path(str(folder / "run.py"), run_name="__main__")
    except SystemExit as done:
        return int(done.code or 0)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `nanops` command line (train's flags are yolov5's own parser's)."""
    parser = argparse.ArgumentParser(prog="nanops", description="NaN-proof kernels for Transformer-YOLOv5 training")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="yolov5's own training (any `yolov5 train` flag), protected by nanops",
                   add_help=False)
    demo = sub.add_parser("demo", help="plain yolov5 training vs nanops on a run with a corrupt batch; trains in a "
                                       "temporary folder, writes only the plot")
    demo.add_argument("--epochs", type=int, default=30, help="epochs of each of the three runs (default %(default)s)")
    demo.add_argument("--corrupt-step", type=int, default=5,
                      help="training batch, counted from 0 over the whole run, given a non-finite pixel "
                           "(default %(default)s: epoch 1's second batch with the defaults)")
    demo.add_argument("--batch", type=int, default=16, help="batch size (default %(default)s)")
    demo.add_argument("--images", type=int, default=64, help="synthetic training images (default %(default)s)")
    demo.add_argument("--img", type=int, default=64, help="image size, a multiple of 32 (default %(default)s)")
    demo.add_argument("--plot", default="nanops_demo.png",
                      help="where the chart of the three runs is written (default ./%(default)s)")
    demo.add_argument("--no-plot", action="store_true", help="write no chart")
    demo.set_defaults(fn=_cmd_demo)
    check = sub.add_parser("check", help="what serves nanops' ops here (GPUs, kernels or fallback), then one "
                                         "yolov5s-transformer forward/backward checked for NaN/Inf")
    check.add_argument("--batch", type=int, default=2, help="images in the batch (default %(default)s)")
    check.add_argument("--img", type=int, default=256, help="image size, a multiple of 32 (default %(default)s)")
    check.add_argument("--patch", action="store_true", help="swap in nanops' stable attention first")
    check.add_argument("--inject-nan", action="store_true", help="put a NaN in the input to see the report")
    check.set_defaults(fn=_cmd_check)
    doctor = sub.add_parser("doctor", help="check YOLO labels and hyperparameters for causes of NaN")
    doctor.add_argument("data", nargs="?", help="a yolov5 data yaml, or a folder of YOLO label files")
    doctor.add_argument("--hyp", help="a yolov5 hyp yaml to check")
    doctor.add_argument("--optimizer", default="SGD", choices=["SGD", "Adam", "AdamW", "RMSProp"],
                        help="the optimizer the hyp is used with (default %(default)s)")
    doctor.add_argument("--weights", help="a model file (yolov5/ultralytics .pt) whose float16 headroom is measured "
                        "in one forward on DATA's training images under float16 autocast")
    doctor.add_argument("--img", type=int, default=640, help="image size for --weights (default %(default)s)")
    doctor.add_argument("--batch", type=int, default=8, help="images for --weights (default %(default)s)")
    doctor.add_argument("--fix-to", help="write cleaned copies of the label files into this folder (originals "
                                         "untouched; no default: nothing is written without it)")
    doctor.add_argument("--max-report", type=int, default=200, help="print at most this many problems "
                                                                    "(default %(default)s)")
    doctor.set_defaults(fn=_cmd_doctor)
    bench = sub.add_parser("bench", help="run every benchmark on this device; one table, JSON and a chart")
    bench.add_argument("--only", help="comma-separated benchmark names (e.g. softmax,clip); default: all")
    bench.add_argument("--out", default="nanops-bench",
                       help="results folder: DIR/<device>/ (default ./%(default)s; the checkout's committed "
                            "reports are benchmarks/results)")
    bench.set_defaults(fn=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        # Every flag after `train` is yolov5's (its own parser, its own --help and errors).
        from .yolov5.cli import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
