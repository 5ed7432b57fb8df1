"""nanops for Hugging Face Accelerate loops and the transformers Trainer.

    accelerator = Accelerator(mixed_precision="fp16")        # or "bf16", "no"
    protection = nanops.huggingface.protect(accelerator)     # before accelerator.prepare
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    trainer = transformers.Trainer(model=model, args=args, train_dataset=...)
    protection = nanops.huggingface.protect(trainer)          # before trainer.train()

`protect` puts nanops.GradScaler in the Accelerator's place (torch's with fp16; with "no" or
"bf16", one that still checks the grads and skips a non-finite step) before `prepare` hands it
to the optimizers, so Accelerate's own bookkeeping stays true: `optimizer_step_was_skipped` is
set for a skipped step and the prepared LR scheduler does not step after it (the Trainer's
scheduler included). On top, on the Accelerator object only (instance attributes):
  * `backward`: with `gradient_accumulation_steps` > 1, each micro-batch's loss checked after
    its backward (a non-finite one has its BatchNorm updates undone at once and its window's
    step skipped); else a skipped step (on any rank) puts them back as before its batch;
  * `clip_grad_norm_`: nanops' overflow-free fused clip (the Trainer's `max_grad_norm`);
  * the prepared optimizer's `step`: a skipped step is replayed (the model's forward on the
    window's inputs, from each one's RNG state, its `loss` when it returns one) to name the
    first non-finite module, logged on the "nanops" logger (and to `save_dir`'s CSV), and the
    divergence watch is read every `check_every` steps ("warn", or "stop": nanops.Diverged).
With a Trainer, its logs gain `nanops_skipped_steps`, so a skipped step is counted where the
loss is logged, not averaged in silently (`logging_nan_inf_filter` is then not needed).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..clip import clip_grad_norm_
from ..training import DivergenceLimits, GradScaler, RngState, Session, SkippedStep, SkipReport

LOGGER = logging.getLogger("nanops")


class Protection:
    """One Accelerator's protection (see the module docstring)."""

    def __init__(self, accelerator, *, on_divergence: str = "warn", check_every: int = 100,
                 limits: DivergenceLimits | None = None, save_dir: str | Path | None = None) -> None:
        if on_divergence not in ("warn", "stop"):
            raise ValueError(f"nanops.huggingface.protect: on_divergence must be 'warn' or 'stop', got "
                             f"{on_divergence!r}")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"nanops.huggingface.protect: check_every must be a positive int, got {check_every!r}")
        if getattr(accelerator, "_optimizers", None):
            raise ValueError("nanops.huggingface.protect: call it before accelerator.prepare(...) (the prepared "
                             "optimizers already hold Accelerate's scaler)")
        kind = accelerator.distributed_type.value if hasattr(accelerator.distributed_type, "value") else ""
        if str(kind).upper() in ("DEEPSPEED", "FSDP", "XLA", "MEGATRON_LM"):
            raise ValueError(f"nanops.huggingface.protect: {kind} runs its own loss scaling and clipping; nanops "
                             "protects single-device and DDP runs")
        self.accelerator, self.check_every, self.save_dir = accelerator, check_every, save_dir
        old = accelerator.scaler
        self.scaler = GradScaler(accelerator.device.type, enabled=old is not None and old.is_enabled())
        if old is not None and old.is_enabled():
            self.scaler.load_state_dict(old.state_dict())
        accelerator.scaler = self.scaler
        self.session = Session(on_divergence=on_divergence, limits=limits, report=SkipReport(LOGGER),
                               what="nanops.huggingface.protect", log_everywhere=False)
        self.session.state_objects = lambda: {"model": self.session.model}
        self._window: list[tuple[tuple, dict, RngState, torch.Tensor | None]] = []
        self._pending: tuple[tuple, dict, RngState] | None = None
        self._handle = None
        self._replaying = False
        self._install(accelerator)

    skips = property(lambda self: self.session.skips)
    divergences = property(lambda self: self.session.divergences)

    # --- what is put on the Accelerator -----------------------------------------------------
    def _install(self, accelerator) -> None:
        prepare, backward = accelerator.prepare, accelerator.backward

        def protected_prepare(*args, **kwargs):
            out = prepare(*args, **kwargs)
            for obj in out if isinstance(out, tuple) else (out,):
                if isinstance(obj, torch.nn.Module) and self.session.model is None:
                    self._attach(obj)
                elif hasattr(obj, "optimizer") and hasattr(obj, "step_was_skipped"):
                    self._wrap_step(obj)
            return out

        def protected_backward(loss, **kwargs):
            backward(loss, **kwargs)
            flag = None
            if self.session.model is not None and accelerator.gradient_accumulation_steps > 1:
                # Window by window: each micro-batch's BatchNorm updates kept or undone at once.
                flag = self.session.micro_batch(loss)
                self.session.settle()
            # Else the step settles them: a skipped step (on any rank) leaves them as before.
            if self._pending is not None:
                self._window.append((*self._pending, flag))
                self._pending = None

        def protected_clip_grad_norm_(parameters, max_norm, norm_type=2):
            self._fold_window()
            accelerator.unscale_gradients()
            return clip_grad_norm_(parameters, max_norm, norm_type)  # non-finite grads left for the skip

        accelerator.prepare = protected_prepare
        accelerator.backward = protected_backward
        accelerator.clip_grad_norm_ = protected_clip_grad_norm_

    def _attach(self, model: torch.nn.Module) -> None:
        self.session.attach(model, amp=self.accelerator.mixed_precision in ("fp16", "bf16"))
        module = self.session.module

        def remember(mod, args, kwargs):
            if mod.training and torch.is_grad_enabled() and not self._replaying:
                # The batch starts: its BatchNorm snapshot (the window's, made at the first) and
                # its RNG state; its inputs kept by reference for a replay.
                self.session.begin_batch()
                self._pending = (args, kwargs, self.session.rng_state)
        self._handle = module.register_forward_pre_hook(remember, with_kwargs=True)

    def _fold_window(self) -> None:
        flag = self.session.close_window()
        if flag is not None:
            self.scaler.skip_if(flag)  # folded into found_inf by the unscale_ that follows

    def _wrap_step(self, optimizer) -> None:
        step = optimizer.step

        def protected_step(*args, **kwargs):
            if not self.accelerator.sync_gradients:
                return step(*args, **kwargs)  # inside an accumulate() window: Accelerate's no-op
            self._fold_window()
            out = step(*args, **kwargs)
            self._stepped(optimizer)
            return out
        optimizer.step = protected_step

    # --- a step -----------------------------------------------------------------------------
    def _stepped(self, optimizer) -> None:
        session, scaler = self.session, self.scaler
        skipped = bool(optimizer.step_was_skipped)  # Accelerate's, from our scaler's step
        session.stepped(torch.tensor([float(skipped)]), skipped=skipped, scale=scaler.scale_tensor,
                        place=f"(step {session.total_steps})")
        if skipped:
            finding, overflow = None, None
            self._replaying = True  # the replays' forwards are not batches
            try:
                for args, kwargs, rng, _ in sorted(self._window, key=lambda w: w[3] is None or not bool(w[3])):
                    finding, overflow = session.locate(_loss_of(session.model, args, kwargs), rng_state=rng,
                                                       loss_scale=scaler.scale_of_last_skip if scaler.is_enabled()
                                                       else None)
                    if finding is not None:
                        break
            finally:
                self._replaying = False
            finding, promoted = session.agree(finding, overflow)
            session.record(SkippedStep(0, session.total_steps - 1, finding, replayed=bool(self._window),
                                       promoted=promoted, step=session.total_steps - 1), self.save_dir)
        self._window = []
        if session.total_steps % self.check_every == 0:
            session.check(save_dir=self.save_dir)

    def close(self) -> None:
        """The input hook removed, the summary said (the training is over)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self._window, self._pending = [], None
        if self.save_dir is not None:
            self.session.finish(self.save_dir, self.scaler.total_steps, self.scaler.skipped_steps)


def _loss_of(model, args, kwargs):
    """A replay's loss: the model's own `loss` output when it returns one (transformers with
    labels), else the sum of its floating outputs (the forward is what names the module)."""
    def loss():
        out = model(*args, **kwargs)
        value = out.get("loss") if hasattr(out, "get") else getattr(out, "loss", None)
        if isinstance(value, torch.Tensor):
            return value
        return sum(t.float().sum() for t in _tensors(out) if t.is_floating_point())
    return loss


def _tensors(value) -> list[torch.Tensor]:
    """The tensors in a model output: a tensor, or a mapping (a ModelOutput), list or tuple of them."""
    if isinstance(value, torch.Tensor):
        return [value]
    if hasattr(value, "values") and callable(value.values):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _trainer_callback(protection: Protection):
    from transformers import TrainerCallback

    class NanopsCallback(TrainerCallback):
        """The input hook removed at the end of train()."""

        def on_train_end(self, args, state, control, **kwargs):
            protection.close()

    return NanopsCallback()


def protect(target, *, on_divergence: str = "warn", check_every: int = 100, limits: DivergenceLimits | None = None,
            save_dir: str | Path | None = None) -> Protection:
    """Protects an `accelerate.Accelerator` (call before its `prepare`) or a
    `transformers.Trainer` (before `train()`; its Accelerator, its logs, its output_dir for the
    CSV). Returns the Protection (`skips`, `divergences`, `scaler`, `close()`)."""
    accelerator = getattr(target, "accelerator", None)
    if accelerator is not None and hasattr(target, "add_callback"):  # a transformers Trainer
        save = save_dir if save_dir is not None else getattr(target.args, "output_dir", None)
        protection = Protection(accelerator, on_divergence=on_divergence, check_every=check_every, limits=limits,
                                save_dir=save)
        target.add_callback(_trainer_callback(protection))
        log = target.log

        def log_with_skips(logs, *args, **kwargs):
            # Before the Trainer appends to log_history and calls any callback: every logger sees it.
            if "loss" in logs:
                logs["nanops_skipped_steps"] = protection.scaler.skipped_steps
            return log(logs, *args, **kwargs)
        target.log = log_with_skips  # this Trainer object only
        return protection
    if not hasattr(target, "prepare") or not hasattr(target, "backward"):
        raise TypeError(f"nanops.huggingface.protect: expected an accelerate.Accelerator or a transformers.Trainer, "
                        f"got {type(target).__name__}")
    return Protection(target, on_divergence=on_divergence, check_every=check_every, limits=limits,
                      save_dir=save_dir)


__all__ = ["Protection", "protect"]
