"""`nanops demo`: a clean run, plain `yolov5 train` with a corrupt batch, and `nanops train` with the
same corrupt batch, side by side.

Writes a tiny synthetic YOLO dataset (one class of flat-coloured boxes on noise) and trains a
yolov5 nano-width transformer model (yolov5s-transformer's layers at width 0.25) with yolov5's
own train.py three times, same seed and flags: clean; plain with one training batch carrying a
non-finite pixel (as an overflowed image decode gives); nanops train with that batch. The
configuration (64 px, 64 images, batch 16, 30 epochs, lr0 0.1, no mosaic) takes about twenty
seconds a run on two CPU cores, and mAP@.5 climbs from 0.01 to about 0.8, so the point shows in the numbers: nanops tracks the clean run,
plain yolov5 is NaN from the corrupt batch on.
"""
from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ..training.checkpoints import load as load_checkpoint
from ..yolov5 import transformer_yaml
from ..yolov5.shims import prepare_environment, quiet_yolov5_import
from ..yolov5 import SkippedStep, run, run_plain
from .inject import inject_nonfinite_input
from .synthetic import write_yolo_dataset

# What makes a from-scratch detector learn in a minute: a narrow model, one class of large boxes,
# a higher lr0 (yolov5 warms up over at least 100 iterations), no mosaic/scale/translate.
DEMO_WIDTH = 0.25
DEMO_HYP = {"lr0": 0.1, "mosaic": 0.0, "scale": 0.0, "translate": 0.0}


@dataclass
class RunLog:
    """Per-epoch validation results of one training run (read from its results.csv)."""

    name: str
    val_loss: list[float] = field(default_factory=list)
    map50: list[float] = field(default_factory=list)
    skipped: list[SkippedStep] = field(default_factory=list)
    weights_finite: bool = True
    seconds: float = 0.0


def read_results(name: str, save_dir: Path, seconds: float = 0.0) -> RunLog:
    log = RunLog(name, seconds=seconds)
    with (save_dir / "results.csv").open() as f:
        for row in csv.DictReader(f):
            row = {k.strip(): v.strip() for k, v in row.items()}
            log.val_loss.append(sum(float(row[k]) for k in ("val/box_loss", "val/obj_loss", "val/cls_loss")))
            log.map50.append(float(row["metrics/mAP_0.5"]))
    ckpt = load_checkpoint(save_dir / "weights" / "last.pt", map_location="cpu")
    log.weights_finite = all(bool(torch.isfinite(t).all()) for t in ckpt["model"].state_dict().values()
                             if t.is_floating_point())
    return log


def _fmt(v: float) -> str:
    return f"{v:8.4f}" if math.isfinite(v) else f"{str(v):>8}"


def print_table(clean: RunLog, plain: RunLog, ours: RunLog) -> None:
    runs = (clean, plain, ours)
    print(f"\n{'epoch':>5} | " + " | ".join(f"{r.name:^17}" for r in runs))
    print(f"{'':>5} | " + " | ".join(f"{'val loss':>8} {'mAP@.5':>8}" for _ in runs))
    print("-" * 66)
    for e in range(len(clean.val_loss)):
        print(f"{e:>5} | " + " | ".join(f"{_fmt(r.val_loss[e])} {_fmt(r.map50[e])}" for r in runs))
    for s in ours.skipped:
        what = "non-finite batch" if s.kind == "batch" else "skipped step"
        print(f"nanops: {what} at {s.where()}; first non-finite: {s.first_nonfinite}")
    print(f"final mAP@.5: clean {clean.map50[-1]:.3f}, plain yolov5 {plain.map50[-1]:.3f}, nanops "
          f"{ours.map50[-1]:.3f}; nanops vs clean at the end: val loss {_fmt(ours.val_loss[-1]).strip()} vs "
          f"{_fmt(clean.val_loss[-1]).strip()}")
    print(f"final weights finite: plain yolov5 {plain.weights_finite}, nanops {ours.weights_finite}")


def save_plot(clean: RunLog, plain: RunLog, ours: RunLog, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = list(range(len(clean.val_loss)))
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {clean.name: ("tab:green", "-", "o"), plain.name: ("tab:red", "--", "x"),
              ours.name: ("tab:blue", "-", "s")}
    for log in (clean, plain, ours):
        color, line, marker = styles[log.name]
        ax_loss.plot(epochs, [v if math.isfinite(v) else float("nan") for v in log.val_loss], line, color=color,
                     marker=marker, ms=3, label=log.name)
        ax_map.plot(epochs, [v if math.isfinite(v) else 0.0 for v in log.map50], line, color=color, marker=marker,
                    ms=3, label=log.name)
    for ax in (ax_loss, ax_map):
        for e, v in enumerate(plain.val_loss):
            if not math.isfinite(v):
                ax.axvspan(e - 0.5, e + 0.5, color="tab:red", alpha=0.08, lw=0)
        for s in ours.skipped:
            ax.axvline(s.epoch, color="tab:blue", lw=0.8, ls=":")
        ax.set_xlabel("epoch")
    ax_loss.set(ylabel="val loss (red band: plain yolov5 is NaN)", title="validation loss")
    ax_map.set(ylabel="mAP@.5 (plain's NaN epochs drawn as 0)", title="validation mAP@.5")
    if ours.skipped:
        ax_map.text(ours.skipped[0].epoch + 0.4, 0.12, "corrupt batch\nkept out by nanops", color="tab:blue",
                    fontsize=8)
    ax_map.legend(loc="upper left")
    fig.suptitle("yolov5's own train.py, same seed and flags: clean, and with one corrupt batch (plain / nanops)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@contextlib.contextmanager
def _quiet_yolov5():
    """yolov5's banners, tables, warnings and progress bars off (the demo prints its own table)."""
    LOGGER = quiet_yolov5_import("yolov5.utils.general").LOGGER

    level = LOGGER.level
    LOGGER.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        LOGGER.setLevel(level)


def demo_files(root: Path, images: int, image_size: int,
               width: float | None = DEMO_WIDTH) -> tuple[Path, Path, Path]:
    """Writes under `root` the demo's dataset (one class of large flat boxes), a one-class
    yolov5s-transformer yaml (width_multiple `width`; None keeps yolov5s's) and the demo's hyp
    (lr0 0.1, no mosaic: a few epochs reach a useful mAP); returns their paths."""
    data = write_yolo_dataset(root / "data", num_train=images, num_val=max(8, images // 4), size=image_size,
                              num_classes=1, box_size=(0.35, 0.6), max_boxes=2)
    cfg = yaml.safe_load(transformer_yaml().read_text())
    cfg["nc"] = 1
    if width is not None:
        cfg["width_multiple"] = width
    cfg_path = root / ("yolov5s-transformer-1class.yaml" if width is None else f"yolov5-transformer-w{width:g}.yaml")
    cfg_path.write_text(yaml.safe_dump(cfg))
    hyp = yaml.safe_load((transformer_yaml().parents[2] / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    hyp.update(DEMO_HYP)
    hyp_path = root / "hyp.demo.yaml"
    hyp_path.write_text(yaml.safe_dump(hyp))
    return data, cfg_path, hyp_path


def run_demo(epochs: int = 30, corrupt_step: int = 5, batch: int = 16, image_size: int = 64, images: int = 64,
             plot: Path | None = Path("nanops_demo.png"),
             workdir: Path | None = None) -> tuple[RunLog, RunLog, RunLog]:
    """Trains clean, plain-corrupt and nanops-corrupt; prints the per-epoch comparison; returns
    the three logs. corrupt_step counts training batches from 0 (a batch of `batch` images)."""
    prepare_environment()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        data, cfg, hyp = demo_files(root, images, image_size)
        flags = dict(data=str(data), cfg=str(cfg), hyp=str(hyp), weights="", epochs=epochs, batch_size=batch,
                     imgsz=image_size, workers=0, project=str(root / "runs"), exist_ok=True, noplots=True,
                     device="" if torch.cuda.is_available() else "cpu")
        print(f"nanops demo: a yolov5 transformer model (width {DEMO_WIDTH}) trained by yolov5's own train.py for "
              f"{epochs} epochs on {images} synthetic {image_size}px images (batch {batch}), three times with the "
              f"same seed: clean; plain yolov5 with a non-finite pixel in training batch {corrupt_step}; nanops "
              "train with that batch.")
        logs = []
        for name, corrupt, train in (("clean", False, run_plain), ("plain yolov5", True, run_plain),
                                     ("nanops train", True, run)):
            start = time.perf_counter()
            with _quiet_yolov5(), (inject_nonfinite_input(corrupt_step) if corrupt else contextlib.nullcontext()):
                result = train(name=name.replace(" ", "-"), **flags)
            save_dir = Path(result) if isinstance(result, (str, Path)) else Path(result.save_dir)
            log = read_results(name, save_dir, time.perf_counter() - start)
            if not isinstance(result, (str, Path)):
                log.skipped = result.nanops_skipped
            logs.append(log)
    clean, plain, ours = logs
    print_table(clean, plain, ours)
    if plot is not None and (saved := save_plot(clean, plain, ours, plot)):
        print(f"curves: {saved}")
    training = sum(log.seconds for log in logs)
    print(f"({time.perf_counter() - t0:.0f} s, {training:.0f} s of it training)")
    return clean, plain, ours
