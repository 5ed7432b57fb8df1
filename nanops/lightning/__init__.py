"""nanops for PyTorch Lightning (`lightning` 2.x): the protection as one callback.

    import lightning as L
    import nanops.lightning

    protect = nanops.lightning.Protect(on_divergence="warn", patch_attention=True)
    trainer = L.Trainer(precision="16-mixed", gradient_clip_val=10.0, callbacks=[protect])
    trainer.fit(model, loader)

`Protect` keeps the Trainer's own precision ("32-true", "16-mixed", "bf16-mixed") and, when the
fit is set up, puts nanops' precision plugin in place of Lightning's: the same autocast, with
nanops.GradScaler (torch's with AMP on; with AMP off, fp32 or bf16, it still checks the grads
and skips a non-finite step). Each training step then runs on nanops.training.Session's events:
  * a skipped step leaves the BatchNorm statistics as before its batch (on every rank); with
    `accumulate_grad_batches`, every micro-batch's loss is checked after its backward, and a
    non-finite one has its BatchNorm updates undone at once and its window's step skipped;
  * the step: unscale + non-finite check fused, `gradient_clip_val` (norm) through nanops'
    overflow-free fused clip, step or skip; a skipped step is not followed by a step of the
    step-interval LR schedulers (Lightning's `lr_scheduler_step`, held back for that step);
  * a skipped step is replayed (the module's own `training_step` on the same batch, from the
    step's RNG state, with `self.log` silenced) to name the first non-finite module, logged on
    Lightning's logger and written to `<log_dir>/nanops_skipped_steps.csv`;
  * the divergence watch is read every `check_every` steps and at each epoch's end: "warn", or
    "stop" (nanops.Diverged raised out of `fit`: no checkpoint is written after the run went
    bad, the earlier ones stay); under float16 AMP the headroom monitor too.
`patch_attention=True` swaps the LightningModule's nn.MultiheadAttention (and yolov5-style
TransformerLayers) for nanops' stable attention before the fit.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType

from .. import patching
from ..clip import clip_grad_norm_
from ..training import POLICIES, DivergenceLimits, GradScaler, Session, SkippedStep, SkipReport

PRECISIONS = ("32-true", "16-mixed", "bf16-mixed")
_LIGHTNING_PLUGINS = (Precision, MixedPrecision)  # what Lightning picks for PRECISIONS: nanops' goes in their place
LOGGER = logging.getLogger("lightning.pytorch")


class _NanopsPrecision(Precision):
    """Lightning's precision plugin for one of PRECISIONS, with nanops' scaler and guarded step."""

    def __init__(self, protect: Protect, precision: str, device: str) -> None:
        self.protect, self.precision, self.device = protect, precision, device
        self.scaler = GradScaler(device, enabled=precision == "16-mixed")
        self.norm: torch.Tensor | None = None

    @contextlib.contextmanager
    def forward_context(self):
        if self.precision == "32-true":
            yield
            return
        dtype = torch.bfloat16 if self.precision == "bf16-mixed" else torch.float16
        with torch.autocast(self.device, dtype=dtype, cache_enabled=False):
            yield

    @contextlib.contextmanager
    def train_step_context(self):
        self.protect.session.begin_batch()  # the RNG state this batch draws from, for a replay
        with self.forward_context():
            yield

    def pre_backward(self, tensor: torch.Tensor, module) -> torch.Tensor:
        if self.scaler.is_enabled():
            tensor = self.scaler.scale(tensor)
        return super().pre_backward(tensor, module)

    def post_backward(self, tensor: torch.Tensor, module) -> torch.Tensor:
        if self.protect.accumulating:
            # Window by window: each micro-batch's BatchNorm updates kept or undone at once.
            session = self.protect.session
            session.micro_batch(tensor)
            session.settle()
        # Else the step settles them: a skipped step (on any rank) leaves them as before its batch.
        return super().post_backward(tensor, module)

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError("nanops.lightning.Protect: LBFGS re-evaluates its closure inside step(); its steps "
                             "cannot be checked before they are taken")
        closure_result = closure()
        if closure_result is None and model.automatic_optimization:
            return None  # training_step returned None: no backward, no step (as Lightning)
        flag = self.protect.session.close_window()
        if flag is not None:
            self.scaler.skip_if(flag)  # folded into found_inf by the unscale_ that follows
        self.scaler.unscale_(optimizer)  # fused unscale + non-finite check
        self.norm = None
        self._after_closure(model, optimizer)  # on_before_optimizer_step, then the clip (below)
        out = self.scaler.step(optimizer, **kwargs)
        self.protect.stepped(self.scaler, self.norm, closure_result)
        self.scaler.update()
        return out

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=GradClipAlgorithmType.NORM) -> None:
        if clip_val and gradient_clip_algorithm == GradClipAlgorithmType.NORM:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            self.norm = clip_grad_norm_(params, float(clip_val))  # non-finite grads left for the skip
            return
        super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.scaler.is_enabled() and state_dict:
            self.scaler.load_state_dict(state_dict)


class Protect(Callback):
    """nanops' protection of a Lightning fit (see the module docstring).

    Args:
        on_divergence: "warn" or "stop" (nanops.Diverged ends the fit).
        patch_attention: swap the module's attention for nanops' stable one before the fit.
        check_every: optimizer steps between reads of the divergence watch (one host sync).
        on_headroom: under "16-mixed", what a module near float16's limit gets ("warn",
            "promote", "stop", "off").
        limits: the divergence watch's thresholds (nanops.training.DivergenceLimits).
    """

    def __init__(self, on_divergence: str = "warn", *, patch_attention: bool = False, check_every: int = 100,
                 on_headroom: str = "warn", limits: DivergenceLimits | None = None) -> None:
        if on_divergence not in ("warn", "stop"):
            raise ValueError(f"nanops.lightning.Protect: on_divergence must be 'warn' or 'stop', got {on_divergence!r}"
                             + (" (rollback is for Guard, yolov5 and ultralytics)" if on_divergence in POLICIES else ""))
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"nanops.lightning.Protect: check_every must be a positive int, got {check_every!r}")
        self.on_divergence, self.patch_attention, self.check_every = on_divergence, patch_attention, check_every
        self.report = SkipReport(LOGGER)
        self.session = Session(on_divergence=on_divergence, limits=limits, report=self.report, warn=LOGGER.warning,
                               what="nanops.lightning.Protect", on_headroom=on_headroom)
        self.plugin: _NanopsPrecision | None = None
        self._trainer = None
        self._batch = None
        self._held_back = False  # the latest optimizer step was skipped: its scheduler step is held back
        self.accumulating = False  # accumulate_grad_batches > 1: micro-batches checked one by one

    # What the caller reads.
    skips = property(lambda self: self.session.skips)
    divergences = property(lambda self: self.session.divergences)

    @property
    def scaler(self) -> GradScaler | None:
        return self.plugin.scaler if self.plugin is not None else None

    # --- Lightning callback hooks -----------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        precision = str(trainer.precision)
        if precision not in PRECISIONS:
            raise ValueError(f"nanops.lightning.Protect: Trainer(precision={precision!r}) is not supported; use one of "
                             f"{', '.join(PRECISIONS)}")
        strategy = trainer.strategy
        if type(strategy.precision_plugin) not in _LIGHTNING_PLUGINS:
            raise ValueError(f"nanops.lightning.Protect: the Trainer's precision plugin "
                             f"{type(strategy.precision_plugin).__name__} is not Lightning's own; nanops puts its own "
                             "in its place, so it cannot be combined with another")
        device = strategy.root_device.type
        self.plugin = _NanopsPrecision(self, precision, "cuda" if device == "cuda" else "cpu")
        strategy.precision_plugin = self.plugin
        self._trainer = trainer
        self.accumulating = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) > 1
        if self.patch_attention:
            patching.patch(pl_module)
        self.session.begin_run()
        self.session.attach(pl_module, amp=precision != "32-true")
        self.session.state_objects = lambda: {"model": pl_module}
        self.session.stop_note = " Stopping (on_divergence='stop'): the checkpoints written before stay as they were."
        self._hold_back_schedulers(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._batch = (batch, batch_idx)  # a reference, for a replay of a skipped step

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = int(trainer.current_epoch)
        self.session.check(f"(epoch {epoch})", unit="epoch", label=f"epoch {epoch}", save_dir=self._save_dir())

    def on_fit_end(self, trainer, pl_module) -> None:
        scaler = self.scaler
        self.session.finish(self._save_dir(), scaler.total_steps if scaler else 0,
                            scaler.skipped_steps if scaler else 0)
        self._batch = None

    # --- the step ---------------------------------------------------------------------------
    def stepped(self, scaler: GradScaler, norm: torch.Tensor | None, loss) -> None:
        """After scaler.step (`loss`: what Lightning's closure returned, the step's loss): the
        session fed, a skip replayed and recorded, the watch read."""
        session, trainer = self.session, self._trainer
        skipped = scaler.last_step_skipped
        self._held_back = skipped
        session.stepped(torch.tensor([float(skipped)]), skipped=skipped,
                        loss=loss.detach() if isinstance(loss, torch.Tensor) else None, norm=norm,
                        scale=scaler.scale_tensor, place=f"(epoch {trainer.current_epoch}, step {trainer.global_step})")
        if skipped:
            finding, overflow = session.locate(self._replay_loss(), loss_scale=scaler.scale_of_last_skip
                                               if scaler.is_enabled() else None)
            finding, promoted = session.agree(finding, overflow)
            batch_idx = self._batch[1] if self._batch is not None else None
            session.record(SkippedStep(int(trainer.current_epoch), session.total_steps - 1, finding,
                                       batch=batch_idx, promoted=promoted), self._save_dir())
        if session.total_steps % self.check_every == 0:
            session.check(save_dir=self._save_dir())

    def _replay_loss(self):
        """The skipped batch's training_step again, under the step's autocast, its self.log calls
        silenced (a replay logs nothing)."""
        module, plugin = self.session.module, self.plugin
        batch, batch_idx = self._batch if self._batch is not None else (None, None)

        def loss():
            if batch is None:
                raise RuntimeError("no training batch was seen")
            with plugin.forward_context(), _silenced_logging(module):
                out = module.training_step(batch, batch_idx)
            out = out["loss"] if isinstance(out, dict) else out
            if not isinstance(out, torch.Tensor):
                raise RuntimeError(f"training_step returned {type(out).__name__}, not a loss tensor")
            return out
        return loss

    def _hold_back_schedulers(self, pl_module) -> None:
        """The module's lr_scheduler_step (its own, or Lightning's default), on this instance: a
        step-interval scheduler does not step for an optimizer step that was skipped."""
        original = pl_module.lr_scheduler_step
        protect = self

        def lr_scheduler_step(scheduler, metric):
            configs = protect._trainer.lr_scheduler_configs if protect._trainer is not None else []
            interval = next((c.interval for c in configs if c.scheduler is scheduler), "epoch")
            if interval == "step" and protect._held_back:
                return None
            return original(scheduler, metric)
        pl_module.lr_scheduler_step = lr_scheduler_step

    def _save_dir(self) -> Path:
        trainer = self._trainer
        return Path(trainer.log_dir or trainer.default_root_dir) if trainer is not None else Path(".")


@contextlib.contextmanager
def _silenced_logging(module):
    """module.log and module.log_dict do nothing inside (instance attributes over the methods)."""
    had = {name: name in vars(module) for name in ("log", "log_dict")}
    saved = {name: vars(module).get(name) for name in had}
    module.log = module.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for name, present in had.items():
            if present:
                setattr(module, name, saved[name])
            else:
                delattr(module, name)


__all__ = ["PRECISIONS", "Protect"]
