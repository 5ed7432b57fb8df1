"""The protection engine: one training run's state, driven by the events every trainer has.

`Guard` (any loop), the yolov5 wing and the ultralytics wing translate their loop's events into
a `Session`; what follows exists here once:
  * the micro-batch window: each micro-batch's loss checked as it is formed, BatchNorm statistics
    kept or put back per micro-batch (or per step, where no micro-batch was checked);
  * the RNG state each batch starts from, so that a replay draws what the step drew;
  * the replay of a skipped step: its first non-finite module, and a float16 overflow promoted
    to float32, on every rank alike;
  * agreement across ranks on the finding;
  * the divergence watch and its policy (warn, stop, rollback);
  * the record of skips (`SkippedStep`), logged and written to CSV by a `SkipReport`.

The events, in a loop's order (the framework wings call them from their trainer's hooks):

    session.attach(model)                the trained model (DDP-wrapped or not)
    session.begin_batch()                a batch starts: its RNG state (a host copy, no sync)
    session.micro_batch(loss, items)     its loss is formed (with accumulation; optional)
    session.settle()                     after its backward: its BatchNorm updates kept or undone
    session.close_window()               at the optimizer step: the window's flag, to skip on
    session.stepped(found_inf, ...)      the step taken or skipped
    session.locate(loss_fn, scale)       a skipped step replayed: (Finding, overflowing module)
    session.agree(finding, overflow)     ... the same on every rank, the overflow promoted
    session.record(SkippedStep(...))     ... logged and written
    session.check(where)                 every N steps or at an epoch's end: divergence policy,
                                         the float16 headroom read and reported
    session.validation(ok, train_ok)     after a validation
    session.finish(save_dir, ...)        the summary line
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .. import _distributed
from .._torch_private import uncompiled
from ..ops import all_finite
from .divergence import (POLICIES, DivergenceEvent, DivergenceLimits, DivergenceWatch, Diverged, LrFactor,
                         RollbackState, events_of_every_rank, likely_cause, message)
from .global_hooks import forward_pre_hook
from .headroom import HeadroomMonitor
from .headroom_policy import HeadroomPolicy
from .locate import RngState, cuda_devices, find_overflow, locate_step
from .promote import promote_named
from .skips import SkippedStep, SkipReport
from .watch import Finding
from .window import MicroBatchWindow

LossFn = Callable[[], torch.Tensor]


def _warn(text: str) -> None:
    warnings.warn(text, stacklevel=4)  # the caller of Guard.step / the wing's hook


class Session:
    """One protected training's state (see the module's docstring for the events).

    Args:
        on_divergence: "warn", "stop" (nanops.Diverged is raised) or "rollback" (model, EMA and
            optimizer back to the last good state, lr divided by 10).
        limits: the divergence watch's thresholds.
        rollback_every: steps between the states kept for "rollback".
        promote_overflow: run a module whose float16 forward overflowed in float32 from then on.
        report: where skips are logged and written (None: kept in `skips` only).
        warn: how a divergence or a promotion is said (default: warnings.warn).
        stop_note: added to the message of a stop.
        log_everywhere: say things on every rank (Guard), not on rank 0 alone (the trainers).
        on_headroom: under float16 AMP, what a module near float16's limit gets (HeadroomMonitor,
            read at each check): "warn", "promote" (run in float32 ahead of the overflow), "stop"
            (nanops.Diverged with the diagnosis) or "off" (not watched).
        headroom_every: the headroom monitor samples one optimizer step in this many.
    """

    def __init__(
        self,
        *,
        on_divergence: str = "warn",
        limits: DivergenceLimits | None = None,
        rollback_every: int = 50,
        promote_overflow: bool = True,
        report: SkipReport | None = None,
        warn: Callable[[str], None] | None = None,
        stop_note: str | Callable[[], str] = "",
        log_everywhere: bool = False,
        what: str = "Guard",
        on_headroom: str = "warn",
        headroom_every: int = 10,
    ) -> None:
        if on_divergence not in POLICIES:
            raise ValueError(f"{what}: on_divergence must be one of {POLICIES}, got {on_divergence!r}")
        self.headroom_policy = HeadroomPolicy(on_headroom, headroom_every, what)
        self.on_divergence = on_divergence
        self.limits = limits
        self.rollback_every = rollback_every
        self.promote_overflow = promote_overflow
        self.report = report
        self._warn = warn or _warn
        self.stop_note = stop_note
        self.log_everywhere = log_everywhere
        self.promoted: list[str] = []     # modules run in float32 after a float16 overflow (every run)
        self.divergences: list[str] = []  # the divergence messages given
        self.hyp_advice: list[str] = []   # the run's hyperparameter warnings: a divergence's likely cause
        self.amp = False
        self.model: torch.nn.Module | None = None
        self.state_objects: Callable[[], dict[str, object]] = lambda: {"model": self.model}
        self.last_input = None            # the trained model's latest training input (remember_inputs)
        self.lr_factor = LrFactor()       # the lr lowering of rollbacks (hooks on the optimizer)
        self.begin_run()

    # --- a run ------------------------------------------------------------------------------
    def begin_run(self) -> None:
        """A new training (an --evolve generation, a second model.train()): its skips, steps,
        divergence watch and window start afresh; promotions stay."""
        self.divergence = DivergenceWatch(self.limits)
        self.rollback = RollbackState(self.rollback_every) if self.on_divergence == "rollback" else None
        self.lr_factor.remove()  # a new run: its optimizer starts at its own lr
        self.skips: list[SkippedStep] = []
        self.window: MicroBatchWindow | None = None
        self.total_steps = 0
        self._skip_places: dict[int, str] = {}  # optimizer step -> where its skip was
        self._window_flag: torch.Tensor | None = None
        self._rng: RngState | None = None
        self._rng_devices: list[int] | None = None
        if self.report is not None:
            self.report.steps = self.skips

    def attach(self, model: torch.nn.Module, *, amp: bool | None = None) -> None:
        """The model being trained (DDP-wrapped or not); its window opens at the first batch, so
        that weights loaded after the model was built are what a restore gives back."""
        self.model = model
        self.window = None
        self._rng_devices = None
        self.headroom_policy.drop()
        if amp is not None:
            self.amp = amp

    @property
    def module(self) -> torch.nn.Module:
        """The trained model without its DDP or torch.compile wrappers (the names its user knows)."""
        return uncompiled(_distributed.unwrap(uncompiled(self.model)))

    @property
    def world_size(self) -> int:
        """Processes in the torch.distributed world (1 without one)."""
        return _distributed.world_size()

    def on_every_rank(self, value) -> list:
        """Every rank's `value` (picklable), in rank order, on every rank: a collective that
        every rank must call at the same point ([value] without torch.distributed)."""
        return _distributed.gather_to_all(value)

    @property
    def main_rank(self) -> bool:
        """Whether this process says things (rank 0, or every rank where log_everywhere)."""
        return self.log_everywhere or _distributed.rank() == 0

    # --- a batch ----------------------------------------------------------------------------
    def _window(self) -> MicroBatchWindow:
        if self.window is None:
            self.window = MicroBatchWindow(self.model)
        return self.window

    def begin_batch(self) -> None:
        """A batch starts: the RNG state its forward draws from (a host-side copy, no sync); the
        previous micro-batch settled where its trainer has no hook after the backward."""
        if self.model is None:
            return
        self._window().settle()
        if self._rng_devices is None:  # a walk over the model costs ms: once per run
            self._rng_devices = cuda_devices(self.model)
        self._rng = RngState.capture(self._rng_devices)
        if self.amp:
            self.headroom_policy.begin(self)

    def micro_batch(self, loss: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """A micro-batch's loss (and logged loss items), checked on the device; a non-finite one
        flags its window, so that the window's step is skipped. Returns the flag (0-dim bool)."""
        return self._window().check(loss, items)

    def settle(self) -> None:
        """After the micro-batch's backward: its BatchNorm updates kept, or undone if flagged."""
        if self.window is not None:
            self.window.settle()

    def close_window(self) -> torch.Tensor | None:
        """At the optimizer step: the window's flag (None when no micro-batch was checked)."""
        self._window_flag = self.window.close() if self.window is not None else None
        return self._window_flag

    def new_epoch(self) -> None:
        """An epoch starts: a window cut short is dropped (its BatchNorm updates are settled)."""
        if self.window is not None:
            self.window.close()
            self.window.new_epoch()

    @property
    def headroom(self) -> HeadroomMonitor | None:
        """The float16 headroom monitor (made at an AMP run's first batch; None before, or off)."""
        return self.headroom_policy.monitor

    headroom_notes = property(lambda self: self.headroom_policy.notes)

    @property
    def rng_state(self) -> RngState | None:
        return self._rng

    # --- a step -----------------------------------------------------------------------------
    def stepped(self, found_inf: torch.Tensor, *, skipped: bool | None = None, loss: torch.Tensor | None = None,
                norm: torch.Tensor | None = None, scale: torch.Tensor | None = None, place: str = "",
                settle_norms: bool = True) -> None:
        """The optimizer step just taken or skipped (found_inf, a device tensor, 1 when skipped):
        BatchNorm statistics settled by it where no micro-batch of its window was checked (each
        checked one settled itself), the divergence watch fed (device tensors only), a rollback
        state kept. `skipped`, when the caller knows it on the host; `place`, where the step was
        (said by a divergence that starts there)."""
        if settle_norms and self._window_flag is None and self.model is not None:
            # Known on the host: restore or take, no device math; else decided on the device.
            self._window().settle_step(found_inf if skipped is None else skipped)
        self._window_flag = None
        self.headroom_policy.stepped(found_inf, skipped)
        self.divergence.record(found_inf, loss, norm, scale)
        if skipped:
            self._skip_places[self.total_steps] = place
        self.total_steps += 1
        if self.rollback is not None and skipped is not True:
            self.rollback.maybe_take(self.total_steps, self.state_objects(), self._healthy)

    def _healthy(self) -> bool:
        """Whether the model's weights are finite (one fused check, one sync): a state worth keeping."""
        params = [p.detach() for p in self.module.parameters()]
        return not params or bool(all_finite(params))

    def locate(self, loss_fn: LossFn, *, loss_scale: torch.Tensor | float | None = None,
               parameters: list[torch.Tensor] | None = None,
               rng_state: RngState | None = None) -> tuple[Finding | None, str | None]:
        """The skipped step replayed on this rank's module alone (no collective), from the batch's
        RNG state: where it first went non-finite (None: not reproduced) and, under AMP, the
        module whose float16 forward overflowed from finite inputs (else None). A replay that
        raises is the finding: it never stops the training it reports on. `rng_state`: where
        the replayed micro-batch's forward started (default: the batch's, from begin_batch)."""
        module = self.module
        rng = rng_state if rng_state is not None else self._rng
        try:
            with _distributed.local_forward(self.model):
                finding = locate_step(module, loss_fn, parameters=parameters, loss_scale=loss_scale,
                                      rng_state=rng)
        except Exception as err:
            return Finding.replay_failed(err), None
        if finding is not None:
            finding.step = self.total_steps - 1
        overflow = None
        if self.amp and self.promote_overflow and finding is not None:
            with _distributed.local_forward(self.model):
                found = find_overflow(module, finding, loss_fn, rng)
            overflow = found[0] if found is not None else None
        return finding, overflow

    def agree(self, finding: Finding | None, overflow: str | None, *,
              collective: bool = True) -> tuple[Finding | None, list[str]]:
        """The step's finding, the same on every rank (collective: every rank calls it after the
        same skip): the first rank's that names a module, with its rank; a module that overflowed
        on any rank is promoted on all, so the replicas keep computing alike. Returns the
        finding and the modules promoted now."""
        if collective and _distributed.world_size() > 1:
            ranks = _distributed.gather_to_all((finding, overflow))
            for r, (f, _) in enumerate(ranks):
                if f is not None:
                    f.rank = r
            found = [f for f, _ in ranks if f is not None]
            finding = next((f for f in found if f.phase != "replay failed"), found[0] if found else None)
            overflows = [name for _, name in ranks if name is not None]
        else:
            overflows = [overflow] if overflow is not None else []
        return finding, self.promote(overflows)

    def promote(self, names: list[str]) -> list[str]:
        """The modules of these names run in float32 from now on, in the trained model and in
        its copies the run keeps (an EMA: validated, and saved, from it). Returns those promoted
        now."""
        model = self.module
        now = promote_named(model, names)
        copies = {uncompiled(_distributed.unwrap(obj)) for obj in self.state_objects().values()
                  if isinstance(obj, torch.nn.Module)}
        for other in copies - {model}:
            promote_named(other, now)
        self.promoted += now
        return now

    def record(self, skip: SkippedStep, save_dir: Path | str | None = None) -> None:
        """A skip, kept in `skips`; logged and written to save_dir's CSV on the main rank."""
        if skip.finding is not None and skip.step is None:
            skip.step = skip.finding.step
        if self.report is not None and self.main_rank:
            self.report.add(skip, save_dir)
        else:
            self.skips.append(skip)
        if skip.promoted and self.report is None and self.main_rank:
            for name in skip.promoted:
                self._warn(f"nanops: float16 overflow in the forward of {name} (its inputs were finite): it runs "
                           "in float32 from now on, the rest of the model in float16")

    @property
    def last_skip(self) -> SkippedStep | None:
        return self.skips[-1] if self.skips else None

    # --- the run's health -------------------------------------------------------------------
    def check(self, where: str = "", *, collective: bool = True, unit: str = "step", label: str | None = None,
              save_dir: Path | str | None = None) -> None:
        """Reads the divergence watch (one host sync) and applies the policy to what it found,
        then the float16 headroom (its figures to save_dir's CSV; `unit`, `label`: what one read
        period is, as HeadroomMonitor.read). collective: every rank reads at the same point (a
        stop, rollback or promotion taken by one replica alone would hang or split the others)."""
        events = self.divergence.read()
        self._handle(events_of_every_rank(events) if collective else events, where)
        self.headroom_policy.read(self, unit, label, save_dir, collective)

    def validation(self, val_finite: bool, train_finite: bool, where: str = "", val_loss: float | None = None,
                   train_loss: float | None = None) -> None:
        """After a validation (numbers the trainer read on the host): non-finite validation with a
        finite training loss, or a validation loss far above the training loss or its own best,
        is a divergence."""
        event = self.divergence.validation(val_finite, train_finite, self.total_steps, val_loss, train_loss)
        if event is not None:
            self._handle([event], where)

    def _handle(self, events: list[DivergenceEvent], where: str) -> None:
        rolled_back = False
        for event in events:
            last = self.last_skip
            finding = last.first_nonfinite if last is not None and last.finding is not None else None
            place = self._skip_places.get(event.step) or where
            text = message(event, likely_cause(event, self.amp, self.hyp_advice, finding), place, finding)
            if self.promoted:
                text += f" Promoted to float32 so far: {', '.join(self.promoted)}."
            if self.on_divergence == "stop":
                self.divergences.append(text)
                raise Diverged(text + (self.stop_note() if callable(self.stop_note) else self.stop_note))
            if self.on_divergence == "rollback" and not rolled_back:
                text += self._roll_back(event)
                rolled_back = True
            self.divergences.append(text)
            if self.main_rank:
                self._warn(text)

    def _roll_back(self, event: DivergenceEvent) -> str:
        """Model, EMA, optimizer and scaler back to the newest healthy state from before the
        event, the learning rate divided by 10 for good, every divergence rule watched afresh.
        Returns what is said of it."""
        objects = self.state_objects()
        step = self.rollback.restore(event.step, objects, oldest=event.kind in ("loss", "norm", "validation"))
        if step is None:
            return (f" Nothing to roll back to: no healthy state was kept before step {event.step} "
                    "(the first is taken after the first healthy step).")
        if self.window is not None:
            self.window.resnapshot()
        for obj in objects.values():
            if isinstance(obj, torch.optim.Optimizer):
                self.lr_factor.lower(obj, 0.1)
        self.divergence = DivergenceWatch(self.limits)  # watched again, from the restored state
        names = ", ".join(name for name, obj in objects.items() if obj is not None)
        return (f" Rolled back to optimizer step {step}'s {names}; the learning rate is divided by 10 from now on "
                f"(x{self.lr_factor.factor:g} at each step, on top of the schedule).")

    def finish(self, save_dir: Path | str, total_steps: int, skipped_steps: int | None = None,
               notes: list[str] = ()) -> None:
        """The summary line (and the CSV once more), on the main rank."""
        notes = list(notes)
        self.headroom_policy.drop()
        if self.promoted:
            notes.append(f"Run in float32 after a float16 overflow: {', '.join(self.promoted)}.")
        if self.report is not None and self.main_rank:
            self.report.finish(save_dir, total_steps, skipped_steps, " ".join(notes))

    # --- what the trained model is given ----------------------------------------------------
    def remember_inputs(self):
        """From now on `last_input` is the trained model's latest training input (a reference,
        no copy: the batch tensor or dict), for a replay where the trainer does not hand it over.
        A process-wide hook filtered by module identity: nothing of nanops is attached to the
        model a trainer pickles. Returns the handle (`.remove()`)."""
        def remember(module, args):
            if (self.model is not None and module is self.module and module.training and torch.is_grad_enabled()
                    and args and isinstance(args[0], (dict, torch.Tensor))):
                self.last_input = args[0]
        return forward_pre_hook(remember)
