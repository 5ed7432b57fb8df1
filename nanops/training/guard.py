"""A guarded optimizer step for yolov5's train loop, and `Guard`, which owns one loop's protection.

`guarded_step` replaces
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
with one call that fuses unscale + non-finite check + clip, skips the step when any grad is
NaN/Inf (with AMP off too, where yolov5 on CPU would write the NaN into the weights), updates
the scaler and zeroes the grads.

Host synchronisation: none with an optimizer that takes `found_inf` on the device (torch's
fused SGD/Adam/AdamW/Adagrad: the skip happens inside its kernel) once its state exists; one,
reading whether to step, with any other optimizer, on an optimizer's first step, or when a
`locate` closure must know whether to replay.

Under torch.distributed every rank takes the same decision: DDP's grads are all-reduced, so the
check over them agrees already; DTensor grads (FSDP2) agree through the norm, whose summaries are
gathered over the mesh anyway; a flag only one rank can see (a non-finite micro-batch of an
accumulation window) is all-reduced with the step's found_inf (one 4-byte all_reduce, on the
stream). Replays run on each rank's own module, with no collective; the findings are gathered.
"""
from __future__ import annotations

import inspect
import logging
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from .. import _distributed
from .._torch_private import loss_scale, record_found_inf, steps_with_found_inf
from ..clip import clip_coef_for_fused_step, clip_grad_norm_
from .divergence import DivergenceLimits
from .headroom import Headroom
from .session import Session
from .skips import SkippedStep, SkipReport
from .watch import Finding

LossFn = Callable[[], torch.Tensor]


class StepResult:
    """What one guarded step did.

    Attributes:
        total_norm: 0-dim float tensor on the grads' device, the norm of the (unscaled) grads
            before clipping (inf/NaN when they held non-finite values).
        found_inf: (1,) float32 tensor on the grads' device, 1.0 when the step was skipped.
        finding: where a skipped step first went non-finite, found by replaying it (only when a
            `locate` closure was given), else None.
    """

    def __init__(self, total_norm: torch.Tensor, found_inf: torch.Tensor, finding: Finding | None = None,
                 skipped: bool | None = None) -> None:
        self.total_norm = total_norm
        self.found_inf = found_inf
        self.finding = finding
        self._skipped = skipped
        self.loss_scale: torch.Tensor | None = None  # a skipped AMP step's loss scale (its backward's)

    @property
    def skipped(self) -> bool:
        """True when the grads held NaN/Inf and the optimizer did not step (skip EMA too). Reading
        it synchronises with the device once when the step itself did not need to."""
        if self._skipped is None:
            self._skipped = bool(self.found_inf.item())
        return self._skipped

    def __repr__(self) -> str:
        skipped = "unread" if self._skipped is None else self._skipped
        return f"StepResult(total_norm={self.total_norm!r}, skipped={skipped}, finding={self.finding})"


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _grad_device(params: list[torch.Tensor]) -> torch.device:
    for p in params:
        if p.grad is not None:
            return p.grad.device
    return torch.device("cpu")


def _skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` can skip itself from a `found_inf` tensor (as torch's GradScaler
    drives fused optimizers) and leave its state as it was. Its first step cannot: fused SGD
    would keep uninitialised momentum buffers, Adam fresh zero moments, where there were none."""
    if not steps_with_found_inf(optimizer):
        return False
    if "grad_scaler" in inspect.signature(optimizer.step).parameters:
        return False  # the deprecated protocol: the optimizer would call our scaler
    params = [p for p in _optimizer_params(optimizer) if p.grad is not None]
    if _distributed.any_sharded(params):
        return False  # DTensor optimizers dispatch per shard: keep found_inf off their step
    return all(optimizer.state.get(p) for p in params)


def _fold(found_inf: torch.Tensor, window_flag: torch.Tensor | None) -> None:
    """found_inf |= window_flag, on the device: a non-finite micro-batch of the accumulation window
    skips the step even where the summed grads stayed finite."""
    if window_flag is not None:
        found_inf.copy_(torch.maximum(found_inf, window_flag.to(found_inf).reshape(found_inf.shape)))


def _check_arguments(optimizer, scaler) -> bool:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"guarded_step: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"guarded_step: scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    amp = scaler is not None and scaler.is_enabled()
    if amp and loss_scale(scaler) is None:
        # Checked before anything changes: torch's unscale_ raises the same after nothing happened.
        raise RuntimeError("guarded_step: the scaler's scale is None. This may indicate your script did not use "
                           "scaler.scale(loss or outputs) earlier in the iteration.")
    return amp


def _step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    max_norm: float,
    parameters: list[torch.Tensor] | None,
    *,
    window_flag: torch.Tensor | None = None,
    known: bool = False,
    agree: bool = False,
    group=None,
) -> StepResult:
    """The step itself: unscale + check + clip fused, step or skip, scaler updated, grads zeroed.
    known: the caller must know on the host whether the step was skipped (to replay it), so the
    optimizer's own device-side skip is not used; a skip's loss scale is then kept on the result."""
    amp = _check_arguments(optimizer, scaler)
    params = parameters if parameters is not None else _optimizer_params(optimizer)
    device = _grad_device(params)
    found_inf = torch.zeros(1, device=device)
    inv_scale = loss_scale(scaler).double().reciprocal().float() if amp else None
    skipped: bool | None = None
    if not known and _skips_on_device(optimizer):
        # The optimizer's kernel reads found_inf and leaves params and state alone when it is 1,
        # and divides the grads by grad_scale as it reads them: the unscale and the clip ride on
        # the step, so the grads are read once by the norm and never rewritten by the clip.
        total_norm, divisor = clip_coef_for_fused_step(params, max_norm, inv_scale=inv_scale, found_inf=found_inf)
        _fold(found_inf, window_flag)
        if agree:
            _distributed.agree(found_inf, group)
        optimizer.grad_scale, optimizer.found_inf = divisor, found_inf.view(())  # 0-dim, as GradScaler passes
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    else:
        total_norm = clip_grad_norm_(params, max_norm, inv_scale=inv_scale, found_inf=found_inf)
        _fold(found_inf, window_flag)
        if agree:
            _distributed.agree(found_inf, group)
        skipped = bool(found_inf.item())  # the one host sync of the step
        if not skipped:
            optimizer.step()
    result = StepResult(total_norm, found_inf, None, skipped)
    if skipped and amp:
        result.loss_scale = loss_scale(scaler).clone()  # the backward's: update() is about to back it off
    if amp:
        # GradScaler.update() reads the found_inf that unscale_ would have recorded; record ours
        # so the scale backs off on overflow as usual.
        record_found_inf(scaler, optimizer, device, found_inf)
        scaler.update()
    optimizer.zero_grad()
    return result


def guarded_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    *,
    max_norm: float = 10.0,
    parameters: Iterable[torch.Tensor] | None = None,
    locate: LossFn | None = None,
    model: torch.nn.Module | None = None,
) -> StepResult:
    """Unscale, check, clip, then step or skip; update the scaler; zero the grads.

    Args:
        optimizer: the optimizer to step.
        scaler: a GradScaler, or None / a disabled one (AMP off).
        max_norm: clip threshold (yolov5 uses 10.0).
        parameters: the parameters to clip (default: all of the optimizer's).
        locate: optional closure that runs the step's forward and loss again and returns the loss
            (e.g. `lambda: compute_loss(model(imgs), targets)[0]`); on a skipped step it is
            replayed with every module of `model` checked and `StepResult.finding` names the
            first non-finite one. Healthy steps never call it. Use `Guard` to replay from the
            step's own RNG state and to restore BatchNorm statistics too.
        model: the model `locate` runs (required with `locate`).
    """
    if locate is not None and not isinstance(model, torch.nn.Module):
        raise ValueError("guarded_step: locate needs model= (the torch.nn.Module whose modules are named)")
    params = list(parameters) if parameters is not None else None
    result = _step(optimizer, scaler, max_norm, params, known=locate is not None)
    if locate is not None and result.skipped:
        session = Session(promote_overflow=False)
        session.attach(model)
        result.finding, _ = session.locate(locate, loss_scale=result.loss_scale, parameters=params)
    return result


class Guard:
    """One training loop's protection, the face of nanops.training.Session for hand-written
    loops: a skipped step leaves weights, optimizer state and BatchNorm statistics as they were
    before the batch, and (with `locate`) is replayed from its own RNG state to name the first
    non-finite module.

        guard = nanops.Guard(model, optimizer, scaler, max_norm=10.0)
        for imgs, targets in loader:
            guard.begin()   # optional: marks this step's RNG state (else: the end of the last step)
            with torch.autocast("cuda", enabled=amp):
                loss = compute_loss(model(imgs), targets)
            scaler.scale(loss).backward()
            result = guard.step(locate=lambda: replay_loss(imgs, targets))
            if not result.skipped:   # reading it syncs when the step did not have to
                ema.update(model)
        guard.epoch_end()            # optional: the divergence watch read, the epoch counted

    Healthy steps run no hooks and no replay; the closure runs only on a skipped step.

    Under torch.distributed, build one Guard per rank over the DDP-wrapped (or FSDP2-sharded)
    model and call it identically on every rank: every rank skips the same steps, each restores
    the BatchNorm statistics its own batch moved, the replay runs on each rank's module alone,
    and `findings` holds the first rank's finding that names a module, with its rank.
    `process_group`: grads synchronised by hand over that group (not by DDP or FSDP2) have their
    found_inf all-reduced over it at each step. `save_dir`: replayed skips are also logged
    (logger "nanops") and written to `<save_dir>/nanops_skipped_steps.csv`, and the float16
    headroom figures to `<save_dir>/nanops_headroom.csv`.

    Under float16 AMP (an enabled scaler) one step in `headroom_every` is sampled for each
    module's float16 headroom (nanops.training.HeadroomMonitor); at each divergence check the
    modules within 8x of 65504 are reported with their growth, and `on_headroom` says what they
    get: "warn", "promote" (float32 ahead of the overflow), "stop" (nanops.Diverged) or "off".
    `headroom()` reads it at any point.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler | None = None,
        *,
        max_norm: float = 10.0,
        parameters: Iterable[torch.Tensor] | None = None,
        on_divergence: str = "warn",
        check_every: int = 100,
        limits: DivergenceLimits | None = None,
        promote_overflow: bool = True,
        process_group=None,
        save_dir: str | Path | None = None,
        on_headroom: str = "warn",
        headroom_every: int = 10,
    ) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"Guard: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"Guard: check_every must be a positive int, got {check_every!r}")
        _check_arguments(optimizer, None)
        self.model, self.optimizer, self.scaler, self.max_norm = model, optimizer, scaler, max_norm
        self._params = list(parameters) if parameters is not None else None
        self.save_dir = save_dir
        report = SkipReport(logging.getLogger("nanops")) if save_dir is not None else None
        self.session = Session(on_divergence=on_divergence, limits=limits, rollback_every=check_every,
                               promote_overflow=promote_overflow, report=report, log_everywhere=True,
                               on_headroom=on_headroom, headroom_every=headroom_every)
        self.session.attach(model, amp=scaler is not None and scaler.is_enabled())
        self.session.state_objects = lambda: {"model": self.model, "optimizer": self.optimizer,
                                              "scaler": self.scaler if self.session.amp else None}
        self.check_every = check_every
        self.epoch = 0
        self._skipped: torch.Tensor | None = None  # running count on the device: no sync to keep it
        self.findings: list[tuple[int, Finding | None]] = []  # (step index, finding) of replayed skips
        self.process_group = process_group
        # The first trained parameter's grad as the window's micro-batches left it: a different
        # tensor at the next micro-batch means the grads were dropped in between (zero_grad at an
        # epoch's end cut the window short), and the cut window's flag goes with them.
        self._probe = next((p for p in (self._params or model.parameters()) if p.requires_grad), None)
        self._window_grad: weakref.ref | None = None
        self.begin()

    # The session's state, under the names Guard has always had.
    on_divergence = property(lambda self: self.session.on_divergence)
    promote_overflow = property(lambda self: self.session.promote_overflow)
    divergence = property(lambda self: self.session.divergence)
    promoted = property(lambda self: self.session.promoted)
    skips = property(lambda self: self.session.skips)
    total_steps = property(lambda self: self.session.total_steps)

    def begin(self) -> None:
        """Marks the RNG state the coming step starts from (a host-side copy, no sync)."""
        self.session.begin_batch()

    @property
    def _rng(self):
        return self.session.rng_state

    def micro_batch(self, loss: torch.Tensor) -> torch.Tensor:
        """With gradient accumulation, call it with each micro-batch's loss after its backward.
        A non-finite micro-batch has its BatchNorm statistics updates undone at once (so a window
        cut short, by zero_grad at an epoch's end say, leaves nothing behind) and its window's
        step is skipped. Returns the micro-batch's flag, a 0-dim bool tensor (reading it syncs).
        Use it for every micro-batch or for none; the first call's snapshot is the state at the
        Guard's construction or its last step."""
        grad = self._probe.grad if self._probe is not None else None
        if self._window_grad is not None and grad is not self._window_grad():
            self.session.close_window()  # the grads it flagged were dropped: so is its flag
        self._window_grad = weakref.ref(grad) if grad is not None else None
        flag = self.session.micro_batch(loss)
        self.session.settle()
        return flag

    @property
    def skipped_steps(self) -> int:
        """How many steps were skipped (one host sync when read)."""
        return 0 if self._skipped is None else int(self._skipped.item())

    def step(self, locate: LossFn | None = None, loss: torch.Tensor | None = None) -> StepResult:
        """The guarded step (see `guarded_step`), BatchNorm statistics restored on a skip.

        Args:
            locate: optional closure returning the step's loss again (forward + loss, with the
                step's autocast inside); replayed only when the step is skipped. Under AMP, a
                module whose forward output the replay finds non-finite from finite inputs (a
                float16 overflow) runs in float32 from then on (`promoted` lists them).
            loss: optional, the step's loss, for the divergence watch (kept on the device).

        Every `check_every` steps the divergence watch is read (one host sync) and its events
        handled by `on_divergence`: "warn" (warnings.warn), "stop" (raises nanops.Diverged) or
        "rollback" (model and optimizer back to the last good state, lr divided by 10).
        """
        if loss is not None and not isinstance(loss, (torch.Tensor, int, float)):
            raise TypeError(f"Guard.step: loss must be a tensor or a number, got {type(loss).__name__}")
        session = self.session
        window_flag = session.close_window()
        self._window_grad = None
        result = _step(self.optimizer, self.scaler, self.max_norm, self._params, window_flag=window_flag,
                       known=locate is not None, agree=self._must_agree(window_flag), group=self.process_group)
        self._skipped = result.found_inf.clone() if self._skipped is None else self._skipped.add_(result.found_inf)
        index = session.total_steps
        session.stepped(result.found_inf, skipped=result._skipped, loss=loss, norm=result.total_norm,
                        scale=loss_scale(self.scaler) if session.amp else None, place=f"(step {index})")
        if locate is not None and result.skipped:
            finding, overflow = session.locate(locate, loss_scale=result.loss_scale, parameters=self._params)
            result.finding, promoted = session.agree(finding, overflow)
            self.findings.append((index, result.finding))
            session.record(SkippedStep(self.epoch, index, result.finding, promoted=promoted, step=index),
                           self.save_dir)
        if session.total_steps % self.check_every == 0:
            session.check(save_dir=self.save_dir)
        self.begin()
        return result

    def epoch_end(self) -> None:
        """Optional: an epoch ended. The divergence watch is read (one host sync, every rank at
        once) and the epoch counted (skips record it)."""
        self.session.check(f"(epoch {self.epoch})", label=f"epoch {self.epoch}", save_dir=self.save_dir)
        self.epoch += 1

    def headroom(self) -> list[Headroom]:
        """Float16 headroom now (one host sync; a read period closes, as at a check): every
        module output (and attention q·k/√d) that ran in float16 in the sampled steps since the
        last read, tightest first, as a fraction of 65504 with its growth since the previous
        read. Empty without float16 AMP, with on_headroom="off", or when no step was sampled
        since the last read (then `session.headroom.latest` holds the last read's)."""
        monitor = self.session.headroom
        if monitor is None:
            return []
        monitor.read(label=f"step {self.total_steps}", save_dir=self.save_dir)
        return list(monitor.latest)

    def finish(self) -> None:
        """Optional: the run's summary line, and the CSV written, where `save_dir` was given."""
        if self.save_dir is not None:
            self.session.finish(self.save_dir, self.total_steps, self.skipped_steps)

    def _must_agree(self, window_flag: torch.Tensor | None) -> bool:
        """Whether the ranks must all-reduce found_inf (over process_group, default the world): not
        where they agree already (one process; DDP-synced or DTensor grads and no rank-local
        window flag). Every rank reaches the same answer: windows are opened by the same calls
        on every rank."""
        if _distributed.world_size() == 1:
            return False
        return self.process_group is not None or window_flag is not None
