"""The record of a protected run's skipped steps: the console line, the CSV, the summary.

Shared by `nanops train` (yolov5) and `nanops.ultralytics.protect`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from collections.abc import Callable

import torch

from .. import _distributed
from .locate import RngState, find_overflow, locate_step
from .promote import promote_named
from .watch import Finding

SKIPPED_CSV = "nanops_skipped_steps.csv"


@dataclass
class SkippedStep:
    """One skip of a protected run. kind "step": an optimizer step was skipped (its grads held
    NaN/Inf); "batch": a micro-batch's loss was non-finite (its BatchNorm updates undone, its
    accumulation window's step skipped, or dropped if the window was cut short), with its images."""

    epoch: int
    iteration: int  # the run's optimizer-loop iteration (yolov5's ni), counted over every epoch
    first_nonfinite: str
    images: list[str] = field(default_factory=list)
    generation: int = 0
    kind: str = "step"
    batch: int | None = None  # within the epoch, from 0, where the trainer tells it

    def where(self) -> str:
        """"epoch 1, batch 1 (iteration 5)", or "epoch 1, iteration 5" when the batch is unknown."""
        if self.batch is None:
            return f"epoch {self.epoch}, iteration {self.iteration}"
        return f"epoch {self.epoch}, batch {self.batch} (iteration {self.iteration})"


def describe(finding: Finding | None) -> str:
    """A Finding as the skip report writes it: "forward of model.0.conv", "backward of model.8.cv3.bn"
    (the gradient flowing into that module's output), "loss ..." or "not reproduced ..."."""
    if finding is None:
        return "not reproduced on replay (every module output, the loss and every gradient were finite)"
    if finding.phase == "loss":
        return "loss (every module's forward output was finite)"
    if finding.phase == "replay failed":
        return f"unknown: the replay raised {finding.module}"
    return f"{finding.phase} of {finding.module or '<root>'}"


def replay_where(
    model: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    *,
    loss_scale: torch.Tensor | float | None,
    rng_state: RngState | None,
    amp: bool,
) -> tuple[str, str | None]:
    """A skipped micro-batch replayed on this rank's `model` alone: where it first went
    non-finite (as `describe` writes it) and, under AMP, the module whose float16 forward
    overflowed from finite inputs (else None), for `agree_on_where` to promote."""
    try:
        finding = locate_step(model, loss_fn, loss_scale=loss_scale, rng_state=rng_state)
    except Exception as err:  # the replay must never stop the training it reports on
        return describe(Finding.replay_failed(err)), None
    where = describe(finding)
    if amp:
        found = find_overflow(model, finding, loss_fn, rng_state)
        if found is not None:
            return where + f" (a float16 overflow: {found[0]} runs in float32 from now on)", found[0]
    return where, None


def agree_on_where(model: torch.nn.Module, where: str, overflow: str | None, promoted: list[str]) -> str:
    """The finding the report gives, the same on every rank, and the overflowing modules run in
    float32 from now on (appended to `promoted`). One process: `where` itself. Under
    torch.distributed (every rank calls it, after the same skip): the first rank's finding that
    names a module, with its rank, and a module that overflowed on any rank promoted on all, so
    the replicas keep computing alike."""
    ranks = _distributed.gather_to_all((where, overflow))
    promoted += promote_named(_distributed.unwrap(model), (o for _, o in ranks if o is not None))
    if len(ranks) == 1:
        return where
    real = [(r, w) for r, (w, _) in enumerate(ranks) if not w.startswith(("not reproduced", "unknown"))]
    r, where = real[0] if real else (0, ranks[0][0])
    return f"{where} (rank {r})"


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

    def add(self, step: SkippedStep, save_dir: Path | str) -> None:
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
