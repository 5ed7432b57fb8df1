"""yolov5 train.py's events, translated into nanops' protection engine (nanops.training.Session).

train.py is not edited: `swaps.installed(protection)` points the names it looks up at the
methods below (the model built, the scaler made, the loss computed, the optimizer step, the EMA
update, a checkpoint written), and `callbacks()` registers the rest on yolov5's own Callbacks
(epoch and batch starts and ends, the fit's end). Everything that is not yolov5-specific (the
micro-batch window, RNG capture, replay, promotion, rank agreement, divergence policy, the skip
report) is the Session's.

Under `torch.distributed.run` (yolov5's multi-GPU DDP) every rank is protected: each rank checks
its own micro-batches and restores its own BatchNorm statistics, the ranks agree on each skip
with one small all_reduce of the window's flag, and after a skipped step each rank replays its
own window's batches (locally, no collective); rank 0, the only rank yolov5 logs from, reports
the skip with the finding and the rank it came from, and writes the one CSV.
"""
from __future__ import annotations

import math

import torch

from ..training import POLICIES, GradScaler, Session, SkippedStep, SkipReport
from .hyp import run_hyp_warnings
from .saving import FiniteCheckpoints, suspect_images, weights_on_disk
from .shims import quiet_yolov5_import, yolov5_callbacks



class Protection:
    """One protected `yolov5 train` run (every --evolve generation, a --resume): the Session and
    what yolov5 hands over (model, scaler, loss, optimizer, EMA)."""

    def __init__(self, opt, on_divergence: str = "warn", on_headroom: str = "warn") -> None:
        if on_divergence not in POLICIES:
            raise ValueError(f"nanops train: --nanops-on-divergence must be one of {', '.join(POLICIES)}, got "
                             f"{on_divergence!r}")
        self.opt = opt  # replaced by the opt train() is given (main rebuilds it on --resume)
        logger = quiet_yolov5_import("yolov5.utils.general").LOGGER
        self.report = SkipReport(logger)
        self.session = Session(on_divergence=on_divergence, report=self.report, warn=logger.warning,
                               stop_note=lambda: f" Stopping (--nanops-on-divergence stop); {self.weights_on_disk()}.",
                               what="nanops train", on_headroom=on_headroom)
        self.session.state_objects = self._state_objects
        self.generation = -1
        self.epoch = -1
        self.model: torch.nn.Module | None = None
        self.scaler: GradScaler | None = None
        self.compute_loss = None
        self.optimizer = None
        self.ema = None
        self.checkpoints = FiniteCheckpoints(logger)  # what was refused, the start weights
        self._last_loss: torch.Tensor | None = None
        self._last_norm: torch.Tensor | None = None
        self._steps_seen = self._skips_reported = 0
        self._window_reported = False
        self._epoch_first_ni: int | None = None
        # Under DDP: this rank's micro-batches of the open window (images, targets, flag), to replay
        # after a skip, and the finding the ranks agreed on, for rank 0's report.
        self._window_inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._agreed: tuple | None = None

    # What the run's callers read.
    unsaved = property(lambda self: self.checkpoints.unsaved)
    skips = property(lambda self: self.session.skips)
    promoted = property(lambda self: self.session.promoted)
    divergences = property(lambda self: self.session.divergences)
    headroom_notes = property(lambda self: self.session.headroom_notes)

    # --- train(), the model, the scaler, the loss: called through the swapped names -----------
    def begin_run(self, hyp, opt) -> None:
        """train(hyp, opt, device, callbacks) starts: once per run, once per --evolve generation."""
        if self.session.on_divergence == "rollback" and self.session.world_size > 1:
            # Each rank would restore its own copy, and DDP never re-syncs parameters.
            raise ValueError("nanops train: --nanops-on-divergence rollback is for single-process runs; "
                             "under torch.distributed use stop (or warn)")
        self.opt = opt
        self.generation += 1
        self.epoch = -1
        self.model = self.scaler = None
        self.checkpoints.start = None
        self._steps_seen = self._skips_reported = 0
        self._window_reported = False
        self.session.begin_run()
        if getattr(opt, "resume", False) or self.generation > 0:
            self.report.keep_existing(opt.save_dir)  # a resumed run, a later generation: append
        # doctor's hyp rules on this run's hyp: said once, kept as the likely cause of a divergence.
        self.session.hyp_advice = run_hyp_warnings(hyp, getattr(opt, "optimizer", "SGD"))
        for line in self.session.hyp_advice:
            self.report.logger.warning(f"nanops: hyp warning: {line}")

    def model_built(self, model: torch.nn.Module) -> None:
        self.model = model
        self.session.attach(model)

    def scaler_made(self, scaler: GradScaler) -> None:
        # BatchNorm statistics are kept per micro-batch by the Session's window (a skipped
        # accumulated step must not undo the healthy micro-batches of its window), not by
        # scaler.protect.
        self.scaler = scaler
        self.session.amp = scaler.is_enabled()

    def loss_computed(self, loss: torch.Tensor, items: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A training micro-batch's loss: checked; returns the items for yolov5's running mean,
        which then leaves a kept-out batch's NaN out of the display and results.csv."""
        if self.model is None:
            return items
        self._last_loss = loss.detach()
        bad = self.session.micro_batch(loss, items)
        items = self.session.window.counted_items(items, bad)
        imgs = self.session.last_input
        if self.session.world_size > 1 and isinstance(imgs, torch.Tensor):
            self._window_inputs.append((imgs, targets, bad))
        return items

    def unscaling(self, scaler: GradScaler, optimizer) -> None:
        """nanops.GradScaler.unscale_ (train.py's, or step's own): the window's last backward is
        done (yolov5 settles on rank 0 only), and its flag is folded into the step's found_inf:
        a non-finite micro-batch skips its window's step."""
        if scaler is not self.scaler:
            return
        self.optimizer = optimizer
        self.session.settle()
        flag = self.session.close_window()
        if flag is not None:
            scaler.skip_if(flag)

    def stepped(self, scaler: GradScaler) -> None:
        """GradScaler.step, on every rank: under DDP a skipped step is replayed on each rank from
        its own window's batches, and the ranks' findings gathered for rank 0's report."""
        if scaler is not self.scaler:
            return
        if self.session.world_size > 1:
            if scaler.last_step_skipped:  # the same on every rank: found_inf was agreed
                self._agreed = self._replay_on_every_rank()
            self._window_inputs = []

    def _replay_on_every_rank(self) -> tuple:
        scale = self.scaler.scale_of_last_skip if self.scaler.is_enabled() else None
        finding, overflow = None, None
        # This rank's flagged micro-batches first; the grads were all-reduced, so a rank whose
        # batches all looked finite may still hold the one that overflowed in the backward.
        for imgs, targets, _ in sorted(self._window_inputs, key=lambda item: not bool(item[2])):
            finding, overflow = self.session.locate(self._loss_fn(imgs, targets), loss_scale=scale)
            if finding is not None:
                break
        return self.session.agree(finding, overflow)

    def clipped(self, norm: torch.Tensor) -> None:
        self._last_norm = norm  # on the device, for the divergence watch

    def ema_may_update(self, ema) -> bool:
        self.ema = ema
        return self.scaler is None or not self.scaler.last_step_skipped  # else: as before the batch

    # --- yolov5 callbacks -------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.epoch += 1
        self._epoch_first_ni = None  # the run's iteration number of this epoch's first batch
        self._window_inputs = []  # zero_grad cuts the window
        self._window_reported = False
        self.session.new_epoch()

    def on_train_batch_start(self) -> None:
        if self.model is not None:
            self.checkpoints.keep_start(self.session.module)
        self.session.begin_batch()

    def on_train_batch_end(self, model, ni, imgs, targets, paths, vals) -> None:
        if self.scaler is None:
            return
        ni = int(ni)
        if self._epoch_first_ni is None:
            self._epoch_first_ni = ni
        batch = ni - self._epoch_first_ni  # within the epoch, from 0
        window = self.session.window
        self.session.settle()  # after the batch's backward: its BatchNorm updates kept or undone
        stepped = self.scaler.total_steps != self._steps_seen
        self._steps_seen = self.scaler.total_steps
        if stepped:
            skipped = self.scaler.last_step_skipped  # read by the step already
            self.session.stepped(torch.tensor([float(skipped)]), skipped=skipped, loss=self._last_loss,
                                 norm=self._last_norm, scale=self.scaler.scale_tensor,
                                 place=f"(from epoch {self.epoch}, iteration {ni})", settle_norms=False)
        # yolov5's progress bar has just read the losses on the host: this read costs no wait.
        batch_bad = window is not None and window.last_bad is not None and bool(window.last_bad)
        if window is not None:
            window.last_bad = None
        new_skip = self.scaler.skipped_steps != self._skips_reported
        self._skips_reported = self.scaler.skipped_steps
        explained = self._window_reported  # the window's bad batch was reported: its step's skip is that
        if stepped:
            self._window_reported = False
        if batch_bad:
            finding, promoted = self._replay_here(imgs, targets, None)
            self._record(SkippedStep(self.epoch, ni, finding, suspect_images(imgs, paths), self.generation,
                                     "batch", batch, promoted=promoted))
            self._window_reported = not stepped
        elif stepped and new_skip and not explained:
            if self._agreed is not None:  # every rank replayed its batches at the step
                (finding, promoted), self._agreed = self._agreed, None
                paths = []  # rank 0 holds only its own batch's paths
            else:
                scale = self.scaler.scale_of_last_skip if self.scaler.is_enabled() else None
                finding, promoted = self._replay_here(imgs, targets, scale)
            self._record(SkippedStep(self.epoch, ni, finding, [str(p) for p in paths], self.generation, "step",
                                     batch, promoted=promoted))

    def _record(self, skip: SkippedStep) -> None:
        self.session.record(skip, self.opt.save_dir)

    def _replay_here(self, imgs, targets, loss_scale):
        """The micro-batch replayed on rank 0 alone (yolov5's callbacks run there only)."""
        finding, overflow = self.session.locate(self._loss_fn(imgs, targets), loss_scale=loss_scale)
        return self.session.agree(finding, overflow, collective=False)

    def _loss_fn(self, imgs: torch.Tensor, targets: torch.Tensor):
        """train.py's forward and loss on this micro-batch, under the step's autocast."""
        model, compute_loss, amp = self.session.module, self.compute_loss, self.session.amp

        def loss():
            with torch.autocast(imgs.device.type, enabled=amp):
                return compute_loss(model(imgs), targets.to(imgs.device))[0]
        return loss

    def on_train_epoch_end(self, epoch) -> None:
        # yolov5 runs its epoch-end callbacks on rank 0 alone: no collective.
        self.session.check(f"(epoch {self.epoch})", collective=False, unit="epoch", label=f"epoch {self.epoch}",
                           save_dir=self.opt.save_dir)

    def on_fit_epoch_end(self, log_vals, epoch, best_fitness, fi) -> None:
        # Registered before yolov5's loggers (Callbacks() is made before train() adds them): an
        # epoch whose every batch was kept out has no training loss, and results.csv says nan,
        # not the 0 yolov5's running mean was left at.
        window = self.session.window
        if window is not None and window.counted_nothing():
            log_vals[:3] = [float("nan")] * 3
        values = [float(v) for v in log_vals[:10]]
        train_finite = all(math.isfinite(v) for v in values[:3])
        val_finite = all(math.isfinite(v) for v in values[7:10])
        self.session.validation(val_finite, train_finite, f"(epoch {self.epoch})", sum(values[7:10]), sum(values[:3]))

    def on_train_end(self, last, best, epoch, results) -> None:
        notes = []
        if self.unsaved:
            notes.append(f"{len(self.unsaved)} checkpoint write(s) refused because the model or EMA was not finite "
                         f"as saved ({', '.join(self.unsaved[:3])}); {self.weights_on_disk()}")
        scaler = self.scaler
        self.session.finish(self.opt.save_dir, scaler.total_steps if scaler is not None else 0,
                            scaler.skipped_steps if scaler is not None else 0, notes)

    def weights_on_disk(self) -> str:
        return weights_on_disk(self.opt.save_dir)

    def callbacks(self):
        """yolov5 Callbacks() with nanops' hooks (train.py makes new ones per --evolve generation)."""
        return yolov5_callbacks(self, ("on_train_epoch_start", "on_train_batch_start", "on_train_batch_end",
                                       "on_train_epoch_end", "on_fit_epoch_end", "on_train_end"))

    def _state_objects(self) -> dict:
        return {"model": self.model, "ema": self.ema.ema if self.ema is not None else None, "optimizer": self.optimizer,
                "scaler": self.scaler if self.scaler is not None and self.scaler.is_enabled() else None}
