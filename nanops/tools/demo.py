"""`nanops demo`: plain `yolov5 train` vs `nanops train` on the same corrupted run.

Writes a tiny synthetic YOLO dataset, then runs the yolov5 package's own training twice with
the same seed, flags and data: once plain, once under `nanops train`. In both, one training
batch carries a non-finite pixel (as an overflowed image decode gives). Plain yolov5 writes
NaN into the weights and BatchNorm statistics, and every later validation is NaN; nanops skips
that step, names the first non-finite module, and trains on.
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

from ..yolov5.env import prepare_environment, quiet_yolov5_import, transformer_yaml
from ..yolov5.train import SkippedStep, inject_nonfinite_input, run, run_plain
from .synthetic import write_yolo_dataset


@dataclass
class RunLog:
    """Per-epoch validation results of one training run (read from its results.csv)."""

    name: str
    val_loss: list[float] = field(default_factory=list)
    map50: list[float] = field(default_factory=list)
    skipped: list[SkippedStep] = field(default_factory=list)
    weights_finite: bool = True


def read_results(name: str, save_dir: Path) -> RunLog:
    log = RunLog(name)
    with (save_dir / "results.csv").open() as f:
        for row in csv.DictReader(f):
            row = {k.strip(): v.strip() for k, v in row.items()}
            log.val_loss.append(sum(float(row[k]) for k in ("val/box_loss", "val/obj_loss", "val/cls_loss")))
            log.map50.append(float(row["metrics/mAP_0.5"]))
    ckpt = torch.load(save_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)
    log.weights_finite = all(bool(torch.isfinite(t).all()) for t in ckpt["model"].state_dict().values()
                             if t.is_floating_point())
    return log


def _fmt(v: float) -> str:
    return f"{v:9.4f}" if math.isfinite(v) else f"{str(v):>9}"


def print_table(plain: RunLog, ours: RunLog) -> None:
    print(f"\n{'epoch':>5} | {'plain yolov5':^21} | {'nanops train':^21}")
    print(f"{'':>5} | {'val loss':>9} {'mAP@.5':>11} | {'val loss':>9} {'mAP@.5':>11}")
    print("-" * 55)
    for e in range(len(plain.val_loss)):
        print(f"{e:>5} | {_fmt(plain.val_loss[e])} {_fmt(plain.map50[e]):>11} | "
              f"{_fmt(ours.val_loss[e])} {_fmt(ours.map50[e]):>11}")
    for s in ours.skipped:
        print(f"nanops skipped the step at epoch {s.epoch}, iteration {s.iteration}; first non-finite: "
              f"{s.first_nonfinite}")
    print(f"final weights finite: plain yolov5 {plain.weights_finite}, nanops {ours.weights_finite}")


def save_plot(plain: RunLog, ours: RunLog, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    epochs = list(range(len(plain.val_loss)))
    fig, (ax_loss, ax_map) = plt.subplots(1, 2, figsize=(10, 4))
    for log, style in ((plain, "o-"), (ours, "s-")):
        label = "plain yolov5 train" if log is plain else "nanops train"
        ax_loss.plot(epochs, [v if math.isfinite(v) else float("nan") for v in log.val_loss], style, label=label)
        ax_map.plot(epochs, [v if math.isfinite(v) else 0.0 for v in log.map50], style, label=label)
    for e, v in enumerate(plain.val_loss):
        if not math.isfinite(v):
            ax_loss.axvspan(e - 0.4, e + 0.4, color="red", alpha=0.1, lw=0)
    ax_loss.set(xlabel="epoch", ylabel="val loss (red: plain is NaN)", title="validation loss")
    ax_map.set(xlabel="epoch", ylabel="mAP@.5", title="validation mAP@.5")
    ax_loss.legend()
    fig.suptitle("yolov5s-transformer, yolov5's own train.py, same seed, one corrupt batch")
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


def run_demo(epochs: int = 5, corrupt_step: int = 1, batch: int = 4, image_size: int = 64, images: int = 16,
             plot: Path | None = Path("nanops_demo.png"), workdir: Path | None = None) -> tuple[RunLog, RunLog]:
    """Trains plain and protected, prints the per-epoch comparison; returns both logs.

    corrupt_step counts training batches from 0 (a batch of `batch` images)."""
    prepare_environment()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = Path(workdir) if workdir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        data = write_yolo_dataset(root / "data", num_train=images, num_val=max(2, images // 2), size=image_size)
        flags = dict(data=str(data), cfg=str(transformer_yaml()), weights="", epochs=epochs, batch_size=batch,
                     imgsz=image_size, workers=0, project=str(root / "runs"), exist_ok=True, noplots=True,
                     device="" if torch.cuda.is_available() else "cpu")
        print(f"nanops demo: yolov5s-transformer trained by yolov5's own train.py for {epochs} epochs on {images} "
              f"synthetic {image_size}px images (batch {batch}); a non-finite pixel in training batch "
              f"{corrupt_step}. Same seed and flags for both runs.")
        with _quiet_yolov5():
            with inject_nonfinite_input(corrupt_step):
                plain_dir = run_plain(name="plain", **flags)
            with inject_nonfinite_input(corrupt_step):
                opt = run(name="nanops", **flags)
        plain = read_results("plain yolov5", plain_dir)
        ours = read_results("nanops", Path(opt.save_dir))
        ours.skipped = opt.nanops_skipped
    print_table(plain, ours)
    if plot is not None and (saved := save_plot(plain, ours, plot)):
        print(f"curves: {saved}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return plain, ours
