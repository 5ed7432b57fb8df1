"""A gradient-accumulation window watched micro-batch by micro-batch, on the device.

With accumulation (yolov5: nbs=64, so batch 16 steps every 4 batches) a corrupt micro-batch is
only seen at the next optimizer step, and its forward has already moved every BatchNorm running
statistic; if the window is cut short (yolov5's zero_grad at an epoch's start) no step ever sees
it, and the next EMA update copies the NaN statistics. Here each micro-batch's loss is checked as
it is formed, and the BatchNorm statistics are kept or put back on the device (no host sync):
a non-finite micro-batch leaves them as before it, and flags the window so that its step is
skipped.
"""
from __future__ import annotations

import torch
from torch import nn

from .snapshot import NormBufferSnapshot


class MicroBatchWindow:
    """Per-micro-batch NaN/Inf checks of one model's training.

        window = MicroBatchWindow(model)
        for micro_batch in window_of_batches:
            loss = compute_loss(model(x), y)
            window.check(loss)            # device-side flag; the window is marked
            loss.backward()
            window.settle()               # BatchNorm updates kept, or undone for a flagged batch
        skip = window.close()             # 0-dim bool tensor: any micro-batch of the window bad
    """

    def __init__(self, model: nn.Module) -> None:
        self._snapshot = NormBufferSnapshot(model)
        self._snapshot.take()
        self._window_bad: torch.Tensor | None = None
        self.last_bad: torch.Tensor | None = None  # the latest micro-batch's flag (0-dim bool)
        self._mean: torch.Tensor | None = None     # mean of the counted loss items this epoch
        self._shown: torch.Tensor | None = None    # what the caller's running mean shows
        self._count: torch.Tensor | None = None
        self._seen_bad: torch.Tensor | None = None
        self._index = 0
        self._settled = True

    def check(self, loss: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Flags this micro-batch when `loss` (and `items`, the logged loss parts) hold NaN/Inf.
        Returns the flag (0-dim bool, on the loss's device; reading it syncs). Call settle() after
        the micro-batch's backward (autograd checks that the statistics it saved are unchanged)."""
        bad = ~torch.isfinite(loss.detach()).all()
        if items is not None:
            bad = bad | ~torch.isfinite(items.detach()).all()
        self._window_bad = bad.clone() if self._window_bad is None else self._window_bad.logical_or_(bad)
        self.last_bad = bad
        self._settled = False
        return bad

    def settle(self) -> None:
        """After the checked micro-batch's backward: its BatchNorm statistics updates are undone if
        it was flagged, kept (and the snapshot retaken) otherwise; on the device. Once per
        micro-batch: further calls before the next check do nothing."""
        if self.last_bad is not None and not self._settled:
            self._snapshot.settle(self.last_bad)
            self._settled = True

    def counted_items(self, items: torch.Tensor, bad: torch.Tensor) -> torch.Tensor:
        """`items` for a running mean of the form mean = (mean * i + items) / (i + 1) (yolov5's
        mloss), adjusted so that mean stays the mean over the micro-batches that counted: the
        epoch's display and results.csv do not carry a skipped batch's NaN. Exact items until a
        bad micro-batch has been met. Call new_epoch() when the caller's mean restarts."""
        items = items.detach()
        if self._mean is None:
            self._mean = torch.zeros_like(items, dtype=torch.float32)
            self._shown = torch.zeros_like(self._mean)
            self._count = torch.zeros((), device=items.device)
            self._seen_bad = torch.zeros((), dtype=torch.bool, device=items.device)
        good = ~bad
        self._count += good
        finite_items = torch.where(good, items.float(), self._mean)
        self._mean = self._mean + (finite_items - self._mean) * good / self._count.clamp(min=1)
        self._seen_bad |= bad
        i = self._index
        adjusted = self._mean * (i + 1) - self._shown * i  # what makes the caller's mean equal ours
        out = torch.where(self._seen_bad, adjusted, items.float())
        self._shown = self._shown + (out - self._shown) / (i + 1)
        self._index += 1
        return out.to(items.dtype)

    def settle_step(self, found_inf: torch.Tensor | bool) -> None:
        """At an optimizer step whose window checked no micro-batch (the loop gives no loss per
        micro-batch): the BatchNorm updates since the last step kept, or undone where the step
        was skipped (`found_inf` a one-element device tensor: no sync; or a bool)."""
        if isinstance(found_inf, torch.Tensor):
            self._snapshot.settle(found_inf)
        elif found_inf:
            self._snapshot.restore()
        else:
            self._snapshot.take()

    def resnapshot(self) -> None:
        """Takes the current BatchNorm statistics as the state to restore (after a rollback)."""
        self._snapshot.take()

    def counted_nothing(self) -> bool:
        """Whether this epoch's loss items were all kept out (one sync; False before any check):
        the caller's running mean then shows a placeholder, not a loss."""
        return self._count is not None and not bool(self._count)

    def new_epoch(self) -> None:
        self._mean = self._shown = self._count = self._seen_bad = None
        self._index = 0

    def close(self) -> torch.Tensor | None:
        """The window's flag (None when no micro-batch was checked), and a new window."""
        flag, self._window_bad = self._window_bad, None
        return flag

    @property
    def open(self) -> bool:
        return self._window_bad is not None
