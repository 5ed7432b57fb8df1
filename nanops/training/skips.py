"""The record of a protected run's skipped steps: the console line, the CSV, the summary.

Shared by `nanops train` (yolov5) and `nanops.ultralytics.protect`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from collections.abc import Callable

import torch

from .locate import RngState, locate_step
from .watch import Finding

SKIPPED_CSV = "nanops_skipped_steps.csv"


@dataclass
class SkippedStep:
    epoch: int
    iteration: int
    first_nonfinite: str


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


def first_nonfinite(
    model: torch.nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    *,
    loss_scale: torch.Tensor | float | None = None,
    rng_state: RngState | None = None,
) -> str:
    """Where a skipped step went non-finite, found by replaying its forward, loss and backward (a
    replay that raises is reported, never allowed to stop the training it reports on)."""
    try:
        return describe(locate_step(model, loss_fn, loss_scale=loss_scale, rng_state=rng_state))
    except Exception as err:
        return describe(Finding.replay_failed(err))


class SkipReport:
    """Skipped steps of one run, logged as they happen and kept in `<save_dir>/nanops_skipped_steps.csv`."""

    def __init__(self, logger) -> None:
        self.logger = logger
        self.steps: list[SkippedStep] = []

    def add(self, step: SkippedStep, save_dir: Path | str) -> None:
        self.steps.append(step)
        self.logger.warning(f"nanops: skipped the optimizer step at epoch {step.epoch}, iteration {step.iteration}: "
                            f"non-finite gradients; first non-finite: {step.first_nonfinite}. Weights, optimizer "
                            "state, EMA and BatchNorm statistics are as before this batch.")
        self.write(save_dir)

    def write(self, save_dir: Path | str) -> Path:
        path = Path(save_dir) / SKIPPED_CSV
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["epoch", "iteration", "first_nonfinite"])
            writer.writerows([s.epoch, s.iteration, s.first_nonfinite] for s in self.steps)
        return path

    def finish(self, save_dir: Path | str, total_steps: int) -> None:
        path = self.write(save_dir)
        epochs = sorted({s.epoch for s in self.steps})
        self.logger.info(f"nanops: {len(self.steps)} of {total_steps} optimizer step(s) skipped for non-finite "
                         "gradients" + (f" (epochs {', '.join(map(str, epochs))}); see {path}" if self.steps else ""))
