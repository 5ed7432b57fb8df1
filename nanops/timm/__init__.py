"""nanops for timm's training script: a drop-in for `timm.utils.NativeScaler`.

timm's train.py takes a loss scaler object and calls it once per micro-batch:

    loss_scaler(loss, optimizer, clip_grad=args.clip_grad, clip_mode=args.clip_mode,
                parameters=model.parameters(), create_graph=second_order, need_update=need_update)

Replace the line that makes it (AMP on: `loss_scaler = NativeScaler(device=device.type)`; for an
fp32 or bf16 run make one too, with `enabled=False`, and pass it where train.py passes
loss_scaler):

    loss_scaler = nanops.timm.NativeScaler(model, device=device.type, enabled=use_amp == "native"
                                           and amp_dtype == torch.float16, ema=model_ema)

Each call then: scaled backward; with accumulation (need_update=False), each micro-batch's loss
checked on the device (a non-finite one has its BatchNorm updates undone at once and its window's
step skipped; a skipped step of one batch has them put back as before it); at the update: unscale +
non-finite check fused, `clip_mode="norm"` through nanops' overflow-free fused clip ("value" and
"agc" through timm's own), step or skip with AMP on *and off*, and no EMA update after a skipped
step (`ema=`). A skipped step's forward is replayed on the model's latest training input to name
the first non-finite module (logged on the "nanops" logger; `save_dir=` writes the CSV), and the
divergence watch is read every `check_every` updates ("warn" or "stop": nanops.Diverged).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..clip import clip_grad_norm_
from ..training import DivergenceLimits, Finding, GradScaler, Session, SkippedStep, SkipReport, locate_forward

CLIP_MODES = ("norm", "value", "agc")


class NativeScaler:
    """timm's NativeScaler, protected (see the module docstring).

    Args:
        model: the trained model (its BatchNorm statistics restored after a skip; its modules named).
        device: the autocast device type ("cuda", "cpu").
        enabled: float16 loss scaling on (timm's AMP) or off (fp32/bf16: steps still checked).
        ema: timm's ModelEmaV2/V3 (anything with `update`): not updated after a skipped step.
        on_divergence: "warn" or "stop".
        check_every: updates between reads of the divergence watch (one host sync).
        save_dir: where the skipped steps' CSV goes (None: logged only).
    """

    state_dict_key = "amp_scaler"  # timm's checkpoint saver stores state_dict() under it

    def __init__(self, model: torch.nn.Module, device: str = "cuda", *, enabled: bool = True, ema=None,
                 on_divergence: str = "warn", check_every: int = 100, limits: DivergenceLimits | None = None,
                 save_dir: str | Path | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"nanops.timm.NativeScaler: model must be a torch.nn.Module, got {type(model).__name__}")
        if on_divergence not in ("warn", "stop"):
            raise ValueError(f"nanops.timm.NativeScaler: on_divergence must be 'warn' or 'stop', got {on_divergence!r}")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"nanops.timm.NativeScaler: check_every must be a positive int, got {check_every!r}")
        self._scaler = GradScaler(device, enabled=enabled)
        self.check_every, self.save_dir = check_every, save_dir
        logger = logging.getLogger("nanops")
        self.session = Session(on_divergence=on_divergence, limits=limits, report=SkipReport(logger),
                               what="nanops.timm.NativeScaler")  # said on rank 0, as timm logs
        self.session.attach(model, amp=enabled)
        # The model's latest training input, for a replay: a hook on the trained module alone (a
        # process-wide one would outlive a loop that stops with an exception, and turn nanops'
        # folded attention off in every model of the process until close()).
        module = self.session.module

        def remember(mod, args):
            if mod is module and mod.training and torch.is_grad_enabled() and args \
                    and isinstance(args[0], torch.Tensor):
                self.session.last_input = args[0]
        self._hook = module.register_forward_pre_hook(remember)
        self.session.begin_batch()  # the BatchNorm statistics a skipped first step goes back to
        self.updates = 0
        self.epoch = 0  # timm's loop does not say: set it at each epoch for the skip records
        self._ema_held_back = False
        self._window: list = []  # this window's (training input, loss flag): a skip replays them
        if ema is not None:
            self._hold_back(ema)

    skips = property(lambda self: self.session.skips)

    @property
    def scaler(self) -> GradScaler:
        return self._scaler

    def __call__(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, clip_grad: float | None = None,
                 clip_mode: str = "norm", parameters=None, create_graph: bool = False, need_update: bool = True):
        if clip_grad is not None and clip_mode not in CLIP_MODES:
            raise ValueError(f"nanops.timm.NativeScaler: clip_mode must be one of {CLIP_MODES}, got {clip_mode!r}")
        if clip_grad is not None and parameters is None:
            raise ValueError("nanops.timm.NativeScaler: clip_grad needs parameters= (as timm's)")
        session, scaler = self.session, self._scaler
        scaler.scale(loss).backward(create_graph=create_graph)
        if need_update and not self._window:
            # A window of one batch: the step settles its BatchNorm updates (undone if skipped).
            self._window.append((session.last_input, None))
        else:  # accumulation: each micro-batch checked, its BatchNorm updates kept or undone at once
            self._window.append((session.last_input, session.micro_batch(loss)))
            session.settle()
        if not need_update:
            return
        flag = session.close_window()
        if flag is not None:
            scaler.skip_if(flag)
        scaler.unscale_(optimizer)
        norm = None
        if clip_grad is not None:
            params = list(parameters)
            if clip_mode == "norm":
                norm = clip_grad_norm_(params, float(clip_grad))  # non-finite grads left for the skip
            else:
                from timm.utils import dispatch_clip_grad

                dispatch_clip_grad(params, clip_grad, mode=clip_mode)
        scaler.step(optimizer)
        skipped = scaler.last_step_skipped
        self._ema_held_back = skipped
        session.stepped(torch.tensor([float(skipped)]), skipped=skipped, loss=loss.detach(), norm=norm,
                        scale=scaler.scale_tensor, place=f"(update {self.updates})")
        scaler.update()
        if skipped:
            self._record()
        self._window = []
        self.updates += 1
        if self.updates % self.check_every == 0:
            session.check()
        session.begin_batch()  # the next batch's RNG state, as near its forward as a scaler can see

    def _record(self) -> None:
        """The skipped window's micro-batches replayed (forward only: timm's scaler never sees the
        targets), flagged ones first, until one names a module; the skip recorded."""
        session, finding = self.session, None
        inputs = [(x, flag) for x, flag in self._window if isinstance(x, torch.Tensor)]
        for x, _ in sorted(inputs, key=lambda item: item[1] is None or not bool(item[1])):
            try:
                finding = locate_forward(session.module, x, autocast=session.amp)
            except Exception as err:  # a replay never stops the training it reports on
                finding = Finding.replay_failed(err)
            if finding is not None:
                finding.step = session.total_steps - 1
                break
        finding, _ = session.agree(finding, None)  # every rank replayed its own window: one finding
        session.record(SkippedStep(self.epoch, self.updates, finding, replayed=bool(inputs),
                                   step=session.total_steps - 1), self.save_dir)

    def _hold_back(self, ema) -> None:
        update = ema.update
        scaler = self

        def held_back_update(*args, **kwargs):
            if scaler._ema_held_back:
                return None  # the weights are as before the skipped batch: the EMA stays as it was
            return update(*args, **kwargs)
        ema.update = held_back_update

    def state_dict(self) -> dict:
        return self._scaler.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self._scaler.load_state_dict(state_dict)

    def close(self) -> None:
        """The input hook taken off the model (the training is over)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


__all__ = ["NativeScaler"]
