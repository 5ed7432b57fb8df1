"""`nanops demo`: plain yolov5 training vs nanops on the same corrupted run.

Builds yolov5s-transformer from the yolov5 package (random init, no downloads), writes a small
synthetic YOLO-format dataset, and trains twice from the same seed: the plain yolov5 step
(torch clip_grad_norm_ then optimizer.step) and nanops (patched TransformerLayer, guarded_step,
watch). One batch carries a corrupt image (an Inf pixel, as an overflowed uint16 decode gives):
the plain run writes NaN into every weight and never recovers; nanops skips that step, names
the first module that went non-finite, and keeps training.
"""
from __future__ import annotations

import contextlib
import copy
import io
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import guarded_step, watch
from ._yolov5_env import build_transformer_model, prepare_environment, transformer_yaml
from .yolov5 import patch


@dataclass
class RunLog:
    name: str
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)


def write_synthetic_dataset(root: Path, num_images: int, num_classes: int, seed: int) -> Path:
    """YOLO-format label files (class cx cy w h, normalised) for `num_images` images."""
    gen = torch.Generator().manual_seed(seed)
    labels = root / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    for i in range(num_images):
        rows = []
        for _ in range(int(torch.randint(1, 4, (1,), generator=gen))):
            w, h = (0.1 + 0.3 * torch.rand(2, generator=gen)).tolist()
            cx, cy = (w / 2 + (1 - w) * torch.rand(1, generator=gen)).item(), (h / 2 + (1 - h) * torch.rand(1, generator=gen)).item()
            rows.append(f"{int(torch.randint(0, num_classes, (1,), generator=gen))} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
        (labels / f"img{i:04d}.txt").write_text("\n".join(rows) + "\n")
    return labels


def load_batch(label_files: list[Path], size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Images rendered from their labels (one flat colour per class over noise) and yolov5 targets."""
    images = 0.2 * torch.rand(len(label_files), 3, size, size, generator=gen)
    targets = []
    for b, path in enumerate(label_files):
        for line in path.read_text().split("\n"):
            if not line.strip():
                continue
            cls, cx, cy, w, h = (float(v) for v in line.split())
            x0, x1 = int((cx - w / 2) * size), int((cx + w / 2) * size)
            y0, y1 = int((cy - h / 2) * size), int((cy + h / 2) * size)
            images[b, int(cls) % 3, y0:y1, x0:x1] = 0.5 + 0.5 * (cls % 2)
            targets.append([b, cls, cx, cy, w, h])
    return images, torch.tensor(targets)


def _loss_fn(model):
    import yaml
    from yolov5.utils.loss import ComputeLoss

    hyp_file = transformer_yaml().parents[2] / "data" / "hyps" / "hyp.scratch-low.yaml"
    model.hyp = yaml.safe_load(hyp_file.read_text())
    return ComputeLoss(model)


def _train(name: str, model, batches, lr: float, use_nanops: bool, device: torch.device) -> RunLog:
    log = RunLog(name)
    model.to(device).train()
    compute_loss = _loss_fn(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.937, nesterov=True)
    watcher = watch(model) if use_nanops else None
    try:
        for images, targets in batches:
            pred = model(images.to(device))
            loss, _ = compute_loss(pred, targets.to(device))
            loss.backward()
            if use_nanops:
                result = guarded_step(optimizer, None, max_norm=10.0)
                finding = watcher.check()
                norm, skipped = float(result.total_norm), result.skipped
                log.findings.append(str(finding.module or "<root>") + f" ({finding.phase})" if finding else "")
            else:  # yolov5 train.py with AMP off: clip, then step whatever the norm was
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0))
                optimizer.step()
                optimizer.zero_grad()
                skipped = False
                log.findings.append("")
            log.loss.append(float(loss))
            log.grad_norm.append(norm)
            log.skipped.append(skipped)
    finally:
        if watcher is not None:
            watcher.remove()
    return log


def _fmt(v: float) -> str:
    return f"{v:10.4g}" if math.isfinite(v) else f"{str(v):>10}"


def print_table(plain: RunLog, ours: RunLog, corrupt_step: int) -> None:
    print(f"\n{'step':>4} | {'plain loss':>10} {'grad norm':>10} | {'nanops loss':>11} {'grad norm':>10} {'skipped':>7} | first non-finite module")
    print("-" * 100)
    for i in range(len(plain.loss)):
        mark = "  <- corrupt batch" if i == corrupt_step else ""
        print(f"{i:>4} | {_fmt(plain.loss[i])} {_fmt(plain.grad_norm[i])} | {_fmt(ours.loss[i]):>11} "
              f"{_fmt(ours.grad_norm[i])} {str(ours.skipped[i]):>7} | {ours.findings[i]}{mark}")
    plain_nan = sum(not math.isfinite(v) for v in plain.loss)
    print(f"\nplain yolov5: {plain_nan}/{len(plain.loss)} steps with a non-finite loss; "
          f"final loss {plain.loss[-1]:.4g}")
    print(f"nanops:       {sum(ours.skipped)} step(s) skipped, "
          f"{sum(not math.isfinite(v) for v in ours.loss)} non-finite loss(es); final loss {ours.loss[-1]:.4g}")


def save_plot(plain: RunLog, ours: RunLog, corrupt_step: int, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = list(range(len(plain.loss)))
    ax.plot(steps, [v if math.isfinite(v) else float("nan") for v in plain.loss], "o-", label="plain yolov5 step")
    ax.plot(steps, ours.loss, "s-", label="nanops (patched + guarded_step + watch)")
    for i, v in enumerate(plain.loss):
        if not math.isfinite(v):
            ax.axvspan(i - 0.5, i + 0.5, color="red", alpha=0.08, lw=0)
    ax.axvline(corrupt_step, color="k", ls="--", lw=1)
    ax.annotate("corrupt batch", (corrupt_step, ax.get_ylim()[1]), ha="left", va="top")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (red: plain loss is NaN)")
    ax.set_title("yolov5s-transformer, same seed, same data")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_demo(steps: int = 24, corrupt_step: int = 6, batch: int = 2, image_size: int = 256, lr: float = 0.01,
             seed: int = 0, plot: Path | None = Path("nanops_demo.png")) -> tuple[RunLog, RunLog]:
    """Trains both runs and prints the comparison; returns their logs."""
    prepare_environment()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        base = build_transformer_model(num_classes=3)
    plain_model, nanops_model = copy.deepcopy(base), copy.deepcopy(base)
    replaced = patch(nanops_model)
    with tempfile.TemporaryDirectory() as tmp:
        labels = write_synthetic_dataset(Path(tmp), steps * batch, num_classes=3, seed=seed)
        files = sorted(labels.glob("*.txt"))
        gen = torch.Generator().manual_seed(seed)
        batches = [load_batch(files[i * batch:(i + 1) * batch], image_size, gen) for i in range(steps)]
    batches[corrupt_step][0][0, 1, 10, 10] = float("inf")  # one corrupt pixel
    print(f"nanops demo: yolov5s-transformer ({sum(p.numel() for p in base.parameters()):,} params), "
          f"{steps} steps of batch {batch} at {image_size}px on {device}; {replaced} TransformerLayer patched; "
          f"an Inf pixel in the batch of step {corrupt_step}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = _train("plain", plain_model, batches, lr, use_nanops=False, device=device)
        ours = _train("nanops", nanops_model, batches, lr, use_nanops=True, device=device)
    print_table(plain, ours, corrupt_step)
    if plot is not None and (saved := save_plot(plain, ours, corrupt_step, plot)):
        print(f"loss curves: {saved}")
    print(f"({time.perf_counter() - t0:.0f} s)")
    return plain, ours
