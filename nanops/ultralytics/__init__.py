"""nanops for `ultralytics` models: stable attention and protected steps through its callbacks.

    from ultralytics import YOLO
    import nanops.ultralytics

    model = YOLO(nanops.ultralytics.YOLOV8N_C3TR)  # YOLOv8n with a C3TR block, shipped with nanops
    nanops.ultralytics.protect(model)
    model.train(data=..., epochs=...)

Nothing of ultralytics is edited. When the trainer is set up, `protect`:
  * switches every nn.MultiheadAttention of the trained model and of its EMA (C3TR,
    TransformerBlock, RT-DETR's AIFI) to nanops' stable attention; patched modules pickle as
    torch's, so last.pt/best.pt load with plain ultralytics;
  * replaces the trainer's GradScaler by nanops.GradScaler (same settings and state): a step
    with NaN/Inf grads is skipped with AMP on *and off*, and the BatchNorm statistics the
    batch's forward moved are restored;
  * guards the trainer's optimizer_step: fused unscale + check, nanops' overflow-free clip
    (max_norm 10, as ultralytics), step or skip, and no EMA update after a skipped step;
  * logs each skipped step (epoch, optimizer step, first non-finite module found by replaying
    the batch's forward), writes `<save_dir>/nanops_skipped_steps.csv`, sums them up at the end.
Ultralytics' own NaN recovery (reloading last.pt at the end of an epoch) then has nothing to do.
Every checkpoint the training loads (model=, pretrained=, resume=, last.pt, best.pt) goes through
nanops.training.checkpoints: no code from the file runs; a crafted file is refused.

Multi-GPU (`device=[0, 1]`): ultralytics pickles the trainer's callbacks (with cloudpickle) for
the workers it launches, so the Protection travels with them and each worker patches its own
model and guards its own step. Every rank skips the same steps (DDP's grads are all-reduced);
each replays its own batch, and rank 0 alone logs and writes the CSV, naming the rank whose
batch went non-finite.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from .. import patching
from ..clip import clip_grad_norm_
from ..ops import all_finite
from ..training import POLICIES, GradScaler, Session, SkippedStep, SkipReport, checkpoint_loading, locate_forward

MAX_NORM = 10.0  # ultralytics' BaseTrainer.optimizer_step
# A YOLOv8n with a C3TR block (yolov5's TransformerLayer): YOLO(nanops.ultralytics.YOLOV8N_C3TR).
YOLOV8N_C3TR = str(Path(__file__).parent / "cfg" / "yolov8n-c3tr.yaml")


class Protection:
    """The nanops state of one ultralytics YOLO object's trainings: ultralytics' callbacks and its
    trainer's optimizer_step, translated into nanops.training.Session's events."""

    def __init__(self, on_divergence: str = "warn", on_headroom: str = "warn") -> None:
        from ultralytics.utils import LOGGER

        if on_divergence not in POLICIES:
            raise ValueError(f"protect: on_divergence must be one of {', '.join(POLICIES)}, got {on_divergence!r}")
        self.report = SkipReport(LOGGER)
        self.session = Session(on_divergence=on_divergence, report=self.report, warn=LOGGER.warning,
                               what="protect", on_headroom=on_headroom)
        self.scaler: GradScaler | None = None
        self._trainer = None
        self._hook = None
        self._loading: contextlib.ExitStack | None = None  # the checkpoint policy, while a training runs
        self._handled_skips = 0                 # skipped steps already reported (on every rank)
        self._skipped_epochs: set[int] = set()  # epochs with a skipped step (on every rank)

    # What the caller reads.
    promoted = property(lambda self: self.session.promoted)
    divergences = property(lambda self: self.session.divergences)
    headroom_notes = property(lambda self: self.session.headroom_notes)
    skips = property(lambda self: self.session.skips)

    def __getstate__(self) -> dict:
        # Pickled with the trainer for a multi-GPU launch: the policy in force here is this
        # process's (a worker enters its own when its trainer is rebuilt); a hook handle stays.
        state = dict(self.__dict__)
        state["_loading"] = None
        state["_hook"] = None
        return state

    # --- ultralytics callbacks --------------------------------------------------------------
    def on_pretrain_routine_start(self, trainer) -> None:
        # Every checkpoint the trainer loads from here on (its model or pretrained weights, the
        # NaN recovery's last.pt, the final validation's best.pt) runs no code from the file; in
        # a multi-GPU worker too, where protect's wrapper of model.train does not reach.
        if self._loading is None:
            self._loading = contextlib.ExitStack()
            self._loading.enter_context(checkpoint_loading())

    def on_pretrain_routine_end(self, trainer) -> None:
        session = self.session
        session.begin_run()  # this training's skips (a YOLO object may train again)
        session.attach(trainer.model, amp=trainer.scaler.is_enabled() or self._bf16(trainer))
        patching.patch(session.module)
        if trainer.ema is not None:
            patching.patch(trainer.ema.ema)
        old = trainer.scaler
        scaler = GradScaler("cuda", enabled=old.is_enabled())
        if old.is_enabled():
            scaler.load_state_dict(old.state_dict())  # a resumed run's scale carries over
        self._handled_skips, self._skipped_epochs = 0, set()
        trainer.scaler = self.scaler = scaler
        trainer.optimizer_step = lambda: self._optimizer_step(trainer)  # this trainer object only
        trainer._handle_nan_recovery = self._nan_recovery(trainer, trainer._handle_nan_recovery)
        self._trainer = trainer
        self._hook = session.remember_inputs()  # the batch dict, for a replay
        if session.on_divergence == "rollback" and session.world_size > 1:
            # Each rank would restore its own copy, and DDP never re-syncs parameters.
            raise ValueError("protect: on_divergence='rollback' is for single-process runs; under DDP use 'stop'")
        session.state_objects = lambda: {
            "model": session.module, "ema": trainer.ema.ema if trainer.ema else None, "optimizer": trainer.optimizer,
            "scaler": scaler if scaler.is_enabled() else None}

    @staticmethod
    def _bf16(trainer) -> bool:
        return getattr(trainer.args, "amp", None) == "bf16"

    def on_train_batch_start(self, trainer) -> None:
        self.session.begin_batch()

    def on_train_batch_end(self, trainer) -> None:
        if self.scaler.skipped_steps == self._handled_skips:
            return  # no step skipped since the last report (the same on every rank: DDP's grads agree)
        self._handled_skips = self.scaler.skipped_steps
        self._skipped_epochs.add(int(trainer.epoch))
        finding, overflow, replayed = self._locate(trainer)
        finding, promoted = self.session.agree(finding, overflow)
        self.session.record(SkippedStep(int(trainer.epoch), self.scaler.total_steps - 1, finding,
                                        replayed=replayed, promoted=promoted), trainer.save_dir)

    def _locate(self, trainer):
        """Replays the skipped step: forward and loss as the trainer ran them (the model computes
        its loss from the batch dict), then the backward at the step's loss scale."""
        session, batch = self.session, self.session.last_input
        if batch is None:
            return None, None, False
        model = session.module
        bf16 = self._bf16(trainer)
        device = next(model.parameters()).device
        if not isinstance(batch, dict):  # compiled runs feed the images alone: forward only
            return locate_forward(model, batch, autocast=session.amp), None, True

        def loss():
            with torch.autocast(device.type, dtype=torch.bfloat16 if bf16 else None, enabled=session.amp):
                return model(batch)[0]

        finding, overflow = session.locate(loss, loss_scale=self.scaler.scale_of_last_skip
                                           if self.scaler.is_enabled() else None)
        return finding, overflow, True

    def on_train_epoch_end(self, trainer) -> None:
        epoch = int(trainer.epoch)
        self.session.check(f"(epoch {epoch})", unit="epoch", label=f"epoch {epoch}", save_dir=trainer.save_dir)

    def on_fit_epoch_end(self, trainer) -> None:
        # The epoch's validation: its losses against the epoch's training loss (ultralytics'
        # own numbers, on the host already). Rank 0 alone validates: under DDP a stop decided
        # here would leave the other ranks waiting, so the rule is for single-process runs.
        if self.session.world_size > 1:
            return
        val = [float(v) for k, v in (trainer.metrics or {}).items() if k.startswith("val/") and "loss" in k]
        tloss = getattr(trainer, "tloss", None)  # a running mean: a dict of loss items, or a tensor
        parts = tloss.values() if isinstance(tloss, dict) else [tloss] if tloss is not None else []
        train = [float(v) for part in parts for v in torch.as_tensor(part).reshape(-1)]
        if val and train:
            self.session.validation(all(math.isfinite(v) for v in val), all(math.isfinite(v) for v in train),
                                    f"(epoch {int(trainer.epoch)})", sum(val), sum(train))

    def on_train_end(self, trainer) -> None:
        total = self.scaler.total_steps if self.scaler is not None else 0
        self.session.finish(trainer.save_dir, total)
        self._release()

    def teardown(self, trainer) -> None:
        self._release()
        self.stop_loading()

    def stop_loading(self) -> None:
        if self._loading is not None:
            self._loading.close()
            self._loading = None

    # --- the guarded step ---------------------------------------------------------------------
    def _optimizer_step(self, trainer) -> None:
        scaler, optimizer = trainer.scaler, trainer.optimizer
        self.session.close_window()
        scaler.unscale_(optimizer)
        norm = clip_grad_norm_(trainer.model.parameters(), max_norm=MAX_NORM)  # leaves non-finite grads untouched
        scaler.step(optimizer)
        skipped = scaler.last_step_skipped
        loss = getattr(trainer, "loss", None)
        self.session.stepped(torch.tensor([float(skipped)]), skipped=skipped,
                             loss=loss if isinstance(loss, torch.Tensor) else None, norm=norm,
                             scale=scaler.scale_tensor, place=f"(epoch {int(trainer.epoch)})")
        scaler.update()
        optimizer.zero_grad()
        if trainer.ema and not skipped:
            trainer.ema.update(trainer.model)

    def _nan_recovery(self, trainer, original):
        """Ultralytics reloads last.pt when the epoch's last loss is NaN: not needed when that NaN
        came from a batch whose step nanops skipped and the model and its EMA are finite."""
        def handle(epoch):
            states = [self.session.module.state_dict(), trainer.ema.ema.state_dict() if trainer.ema else {}]
            tensors = [t for state in states for t in state.values() if t.is_floating_point()]
            explained = epoch in self._skipped_epochs and bool(all_finite(tensors))
            # Under DDP ultralytics broadcasts rank 0's decision inside `original`: every rank
            # must call it, or none.
            if all(self.session.on_every_rank(explained)):
                return False
            return original(epoch)
        return handle

    def _release(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._trainer = None
        self.session.last_input = None


def protect(model, on_divergence: str = "warn", on_headroom: str = "warn") -> Protection:
    """Protects every later `model.train(...)` of an `ultralytics.YOLO` (or RTDETR) object;
    returns the Protection, whose `skips` lists the skipped steps of the latest training
    (SkippedStep), `promoted` the modules run in float32 after a float16 overflow and
    `divergences` the messages of a lost run (on_divergence="rollback" restores the last healthy
    model, EMA, optimizer and scaler with the lr divided by 10; "stop" raises nanops.Diverged at
    the epoch's end). Under float16 AMP each module's float16 headroom is sampled and read at
    each epoch's end (`<save_dir>/nanops_headroom.csv`); modules within 8x of 65504 are reported
    with their trend, and `on_headroom` says what they get: "warn", "promote" (float32 ahead of
    the overflow), "stop" or "off"."""
    protection = Protection(on_divergence, on_headroom)
    for event in ("on_pretrain_routine_start", "on_pretrain_routine_end", "on_train_batch_start",
                  "on_train_batch_end", "on_train_epoch_end", "on_fit_epoch_end", "on_train_end", "teardown"):
        model.add_callback(event, getattr(protection, event))
    train = model.train

    def protected_train(*args, **kwargs):
        # The trainer loads checkpoints as it is built (resume=..., model=...pt), before any
        # callback runs: the whole call loads under nanops' checkpoint policy.
        with checkpoint_loading():
            try:
                return train(*args, **kwargs)
            finally:
                protection.stop_loading()  # the callbacks' policy, inside this one (a training that failed)

    model.train = protected_train  # this object's training only (an instance attribute)
    return protection
