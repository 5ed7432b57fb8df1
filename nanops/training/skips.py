"""The record of a protected run's skipped steps: the console line, the CSV, the summary.

Kept by nanops.training.Session for Guard and every framework wing.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from .watch import Finding

SKIPPED_CSV = "nanops_skipped_steps.csv"


@dataclass
class SkippedStep:
    """One skip of a protected run, the one record every wing and Guard keep of it. kind "step":
    an optimizer step was skipped (its grads held NaN/Inf); "batch": a micro-batch's loss was
    non-finite (its BatchNorm updates undone, its accumulation window's step skipped, or dropped
    if the window was cut short), with its images."""

    epoch: int
    iteration: int  # the run's optimizer-loop iteration (yolov5's ni), counted over every epoch
    finding: Finding | None = None  # where the replay found it first non-finite (rank included)
    images: list[str] = field(default_factory=list)
    generation: int = 0
    kind: str = "step"
    batch: int | None = None  # within the epoch, from 0, where the trainer tells it
    replayed: bool = True     # False: nothing could be replayed (the batch was not seen)
    promoted: list[str] = field(default_factory=list)  # modules run in float32 from this skip on
    step: int | None = None   # the optimizer step, counted from 0

    @property
    def first_nonfinite(self) -> str:
        """Where it first went non-finite, as the log line and the CSV say it (the one place a
        finding becomes text): "forward of model.0.conv", "backward of model.8.cv3.bn" (the
        gradient flowing into that module's output), "loss (...)", "not reproduced (...)",
        with the float16 overflow promoted and, under torch.distributed, the rank."""
        text = describe(self.finding) if self.replayed else "unknown"
        if self.promoted:
            text += f" (a float16 overflow: {', '.join(self.promoted)} runs in float32 from now on)"
        if self.finding is not None and self.finding.rank is not None:
            text += f" (rank {self.finding.rank})"
        return text

    def where(self) -> str:
        """"epoch 1, batch 1 (iteration 5)", or "epoch 1, iteration 5" when the batch is unknown."""
        if self.batch is None:
            return f"epoch {self.epoch}, iteration {self.iteration}"
        return f"epoch {self.epoch}, batch {self.batch} (iteration {self.iteration})"

    def __str__(self) -> str:
        return f"{self.where()}: {self.first_nonfinite}"


def describe(finding: Finding | None) -> str:
    """A replay's Finding as `SkippedStep.first_nonfinite` writes it (None: not reproduced)."""
    if finding is None:
        return "not reproduced on replay (every module output, the loss and every gradient were finite)"
    return finding.where()


CSV_FIELDS = ["generation", "epoch", "iteration", "kind", "images", "first_nonfinite"]


class SkipReport:
    """Skips of one run, logged as they happen and kept in `<save_dir>/nanops_skipped_steps.csv`
    (rows of earlier runs in the same folder, a resumed run's or earlier --evolve generations',
    are kept when `keep_existing` was called)."""

    def __init__(self, logger) -> None:
        self.logger = logger
        self.steps: list[SkippedStep] = []
        self._earlier_rows: list[dict] = []

    def keep_existing(self, save_dir: Path | str) -> None:
        """Keeps the rows already in save_dir's CSV (a resumed run appends to its first part)."""
        path = Path(save_dir) / SKIPPED_CSV
        if path.exists():
            with path.open(newline="") as f:
                self._earlier_rows = [row for row in csv.DictReader(f)]

    def add(self, step: SkippedStep, save_dir: Path | str | None) -> None:
        """Logs the skip and rewrites the CSV (when there is a save_dir)."""
        self.steps.append(step)
        if step.kind == "batch":
            images = ", ".join(step.images[:4]) + (f" and {len(step.images) - 4} more" if len(step.images) > 4 else "")
            self.logger.warning(
                f"nanops: non-finite training batch at {step.where()} (images: "
                f"{images or 'unknown'}); first non-finite: {step.first_nonfinite}. Its BatchNorm updates were undone "
                "and its accumulation window's optimizer step is skipped: weights, optimizer state and EMA take "
                "nothing from it.")
        else:
            self.logger.warning(
                f"nanops: skipped the optimizer step at {step.where()}: non-finite "
                f"gradients; first non-finite: {step.first_nonfinite}. Weights, optimizer state, EMA and BatchNorm "
                "statistics are as before this batch.")
        if save_dir is not None:
            self.write(save_dir)

    def write(self, save_dir: Path | str) -> Path:
        path = Path(save_dir) / SKIPPED_CSV
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self._earlier_rows)
            writer.writerows({"generation": s.generation, "epoch": s.epoch, "iteration": s.iteration, "kind": s.kind,
                              "images": " ".join(s.images), "first_nonfinite": s.first_nonfinite} for s in self.steps)
        return path

    def finish(self, save_dir: Path | str, total_steps: int, skipped_steps: int | None = None,
               note: str = "") -> None:
        path = self.write(save_dir)
        skipped = skipped_steps if skipped_steps is not None else sum(s.kind == "step" for s in self.steps)
        batches = sum(s.kind == "batch" for s in self.steps)
        epochs = sorted({s.epoch for s in self.steps})
        self.logger.info(
            f"nanops: {skipped} of {total_steps} optimizer step(s) skipped for non-finite gradients"
            + (f", {batches} non-finite training batch(es) kept out" if batches else "")
            + (f" (epochs {', '.join(map(str, epochs))}); see {path}" if self.steps else "")
            + (f". {note}" if note else ""))
