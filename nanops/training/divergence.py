"""Noticing a lost run from what the protected step already computes, with no host sync per step.

Each step adds its skip flag, loss, total grad norm and loss scale to a few device tensors (a
handful of tiny ops); `read()` copies them to the host once, every N steps or once an epoch, and
names what happened since the last read:
  * "skips": K consecutive skipped steps (a run that cannot take a step any more);
  * "scale": the AMP loss scale fell below a floor (fp16 grads underflow below it);
  * "loss" / "norm": the loss or the grad norm, smoothed over the healthy steps (an exponential
    average, ~10 steps), grew to `growth` times its lowest smoothed value after the first
    `settle_steps` healthy steps (weights running away: lr far too high). Smoothed, so that a
    noisy, converging run's lucky batch is never the yardstick of its ordinary ones;
  * "validation": validation went non-finite while the training loss stayed finite, or its loss
    grew to `growth` times the training loss or its own best (checked on the host, once an
    epoch, by `validation()`).
Each kind is reported once, the skip run once per run. What to do about it is the caller's policy
(`Policy`): warn, stop (nanops.Diverged), or roll back to the last good state with the lr lowered.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import _distributed

POLICIES = ("warn", "stop", "rollback")
SMOOTHING = 0.1  # weight of a new healthy step in the smoothed loss and norm


class Diverged(RuntimeError):
    """A lost run, under the "stop" policy: the message says what happened, why, and the fix."""


@dataclass
class DivergenceLimits:
    consecutive_skips: int = 10
    scale_floor: float = 1.0
    growth: float = 100.0
    settle_steps: int = 20


@dataclass
class DivergenceEvent:
    kind: str          # "skips", "scale", "loss", "norm", "validation"
    step: int          # the step where it began (the first skip of the run, or the step of the read)
    detail: str        # the numbers
    scales: list[float] = field(default_factory=list)  # the loss scale at the recent reads
    loss_ratio: float = 1.0  # the last healthy loss over the best one, when known


_FIELDS = ("steps", "consecutive", "run_start", "min_scale", "best_loss", "last_loss", "best_norm", "last_norm",
           "healthy", "skips")


def events_of_every_rank(events: list[DivergenceEvent]) -> list[DivergenceEvent]:
    """Under torch.distributed, every rank's events (each kind and step once, the first rank's
    copy) on every rank: a loss is per rank, and a stop or a rollback taken by one replica alone
    would hang or split the others. A collective: every rank calls it at the same read. One
    process: `events` itself."""
    if _distributed.world_size() == 1:
        return events
    merged: dict[tuple[str, int], DivergenceEvent] = {}
    for rank_events in _distributed.gather_to_all(events):
        for event in rank_events:
            merged.setdefault((event.kind, event.step), event)
    return list(merged.values())


class DivergenceWatch:
    def __init__(self, limits: DivergenceLimits | None = None) -> None:
        self.limits = limits or DivergenceLimits()
        self._state: torch.Tensor | None = None  # float64 (len(_FIELDS),) on the step's device
        self._fired: set[str] = set()
        self._fired_run: float = -1.0
        self._scales: list[float] = []
        self._best_val: float | None = None
        self.events: list[DivergenceEvent] = []

    def _init(self, device: torch.device) -> None:
        inf = math.inf
        self._state = torch.tensor([0, 0, -1, inf, inf, inf, inf, inf, 0, 0], dtype=torch.float64, device=device)

    def record(self, skipped: torch.Tensor, loss: torch.Tensor | None = None, total_norm: torch.Tensor | None = None,
               scale: torch.Tensor | None = None) -> None:
        """One optimizer step (device tensors, never read here): skipped is found_inf."""
        if self._state is None:
            self._init(skipped.device)
        s = self._state
        skip = skipped.detach().reshape(-1)[0].to(s.device, torch.float64) > 0
        steps, consecutive = s[0].clone(), s[1]
        new_consecutive = torch.where(skip, consecutive + 1, torch.zeros_like(consecutive))
        s[2] = torch.where(skip & (consecutive == 0), steps, s[2])
        s[1] = new_consecutive
        s[9] += skip.double()
        healthy = ~skip
        s[8] += healthy.double()
        settled = s[8] > self.limits.settle_steps
        if scale is not None:
            s[3] = torch.minimum(s[3], scale.detach().reshape(-1)[0].to(s.device, torch.float64))
        for best, last, value in ((4, 5, loss), (6, 7, total_norm)):
            if value is None:
                continue
            v = torch.as_tensor(value).detach().reshape(-1).float().mean().to(s.device, torch.float64)
            ok = healthy & torch.isfinite(v)
            smoothed = torch.where(torch.isfinite(s[last]), s[last] + SMOOTHING * (v - s[last]), v)
            s[last] = torch.where(ok, smoothed, s[last])
            s[best] = torch.where(ok & settled, torch.minimum(s[best], s[last]), s[best])
        s[0] = steps + 1

    def read(self) -> list[DivergenceEvent]:
        """The new events since the last read (one host sync)."""
        if self._state is None:
            return []
        steps, consecutive, run_start, min_scale, best_loss, last_loss, best_norm, last_norm, _, skips = (
            self._state.cpu().tolist())
        if math.isfinite(min_scale):
            self._scales = (self._scales + [min_scale])[-8:]
        new: list[DivergenceEvent] = []
        lim = self.limits
        if consecutive >= lim.consecutive_skips and run_start != self._fired_run:
            self._fired_run = run_start
            ratio = last_loss / best_loss if math.isfinite(best_loss) and best_loss > 0 and math.isfinite(last_loss) else 1.0
            new.append(DivergenceEvent("skips", int(run_start), f"{int(consecutive)} consecutive skipped steps since "
                                       f"step {int(run_start)} ({int(skips)} of {int(steps)} skipped in all)",
                                       list(self._scales), ratio))
        if min_scale < lim.scale_floor and "scale" not in self._fired:
            self._fired.add("scale")
            new.append(DivergenceEvent("scale", int(steps), f"the AMP loss scale fell to {min_scale:.3g} (below "
                                       f"{lim.scale_floor:g}: float16 grads underflow to zero)", list(self._scales)))
        for kind, best, last in (("loss", best_loss, last_loss), ("norm", best_norm, last_norm)):
            if (kind not in self._fired and math.isfinite(best) and best > 0 and math.isfinite(last)
                    and last >= lim.growth * best):
                self._fired.add(kind)
                what = "training loss (smoothed)" if kind == "loss" else "gradient norm (before clipping, smoothed)"
                new.append(DivergenceEvent(kind, int(steps), f"the {what} grew to {last:.3g}, {last / best:.3g}x its "
                                           f"best of {best:.3g}", list(self._scales)))
        self.events += new
        return new

    def validation(self, val_finite: bool, train_finite: bool, step: int, val_loss: float | None = None,
                   train_loss: float | None = None) -> DivergenceEvent | None:
        """After a validation (host numbers, read by the trainer already): non-finite validation
        while the training loss is finite (eval-mode outputs blown up), or a finite validation
        loss `growth` times the epoch's training loss or its own best (weights running away while
        each training batch still looks tame: checked from the first validation on)."""
        if "validation" in self._fired or not train_finite:
            return None
        detail = None
        if not val_finite:
            detail = ("validation went non-finite while the training loss stayed finite: the weights have grown so "
                      "large that eval-mode outputs overflow")
        elif val_loss is not None and math.isfinite(val_loss):
            growth = self.limits.growth
            if train_loss is not None and math.isfinite(train_loss) and train_loss > 0 and val_loss >= growth * train_loss:
                detail = f"the validation loss {val_loss:.3g} is {val_loss / train_loss:.3g}x the training loss {train_loss:.3g}"
            elif self._best_val is not None and self._best_val > 0 and val_loss >= growth * self._best_val:
                detail = f"the validation loss grew to {val_loss:.3g}, {val_loss / self._best_val:.3g}x its best of {self._best_val:.3g}"
            self._best_val = val_loss if self._best_val is None else min(self._best_val, val_loss)
        if detail is None:
            return None
        self._fired.add("validation")
        event = DivergenceEvent("validation", step, detail, list(self._scales))
        self.events.append(event)
        return event


def likely_cause(event: DivergenceEvent, amp: bool, hyp_advice: list[str] | None = None,
                 finding: str | None = None) -> str:
    """The probable cause and its fix, in one sentence."""
    if hyp_advice:
        return hyp_advice[0]
    if event.kind in ("skips", "scale") and amp and finding and finding.startswith("forward of"):
        return (f"float16 overflow in {finding.removeprefix('forward of ')}: nanops runs that module in float32 "
                "once it is found (see 'promoted'); if skips continue, train with AMP off")
    if event.kind in ("loss", "norm", "validation") or event.loss_ratio >= 10:
        return "the learning rate is too high for this model and optimizer: lower lr0 (10x at least)"
    if event.kind == "scale":
        return "every recent step overflowed: a persistent overflow, not a corrupt batch; lower lr0 or train with AMP off"
    return "every step is non-finite: look at the first non-finite module named above, and lower lr0"


def message(event: DivergenceEvent, cause: str, where: str = "", finding: str | None = None) -> str:
    scales = ", ".join(f"{s:.3g}" for s in event.scales[-4:])
    return (f"nanops: the run is diverging: {event.detail}{(' ' + where) if where else ''}"
            + (f"; first non-finite: {finding}" if finding else "")
            + (f"; loss scale at recent checks: {scales}" if scales else "")
            + f". Likely cause: {cause}.")


class RollbackState:
    """The last healthy model, EMA, optimizer and scaler state, kept in memory for the "rollback"
    policy: the first healthy step's, then one every `every` healthy steps (the last two kept).
    A step is taken as healthy when it was not skipped and its weights are finite."""

    def __init__(self, every: int = 50) -> None:
        self.every = every
        self._saved: list[tuple[int, dict]] = []  # (step, state); the last two

    def maybe_take(self, step: int, objects: dict[str, object], healthy: Callable[[], bool]) -> None:
        """After optimizer step `step` (counted from 1): a copy when one is due (the first, then
        every `every` steps) and `healthy()` says so (it may sync: called only when due)."""
        if self._saved and step % self.every:
            return
        if not healthy():
            return
        state = {name: copy.deepcopy(obj.state_dict()) for name, obj in objects.items() if obj is not None}
        self._saved = (self._saved + [(step, state)])[-2:]

    def restore(self, before_step: int, objects: dict[str, object], oldest: bool = False) -> int | None:
        """Loads the newest state taken at or before `before_step` (oldest: the oldest one kept,
        for a growth that may have begun before the newest copy); returns its step (None if none)."""
        for step, state in (self._saved if oldest else reversed(self._saved)):
            if step <= before_step:
                for name, obj in objects.items():
                    if obj is not None and name in state:
                        obj.load_state_dict(state[name])
                return step
        return None


class LrFactor:
    """A factor on every learning rate of an optimizer, applied at each of its steps on top of
    whatever its scheduler set (and undone right after, so the schedule itself runs on
    untouched): a lowering that no scheduler recomputes away, be it torch's, yolov5's LambdaLR
    and warmup, or ultralytics' own. Step hooks on the optimizer, not saved with its state."""

    def __init__(self) -> None:
        self.factor = 1.0
        self._hooked: dict[int, tuple] = {}
        self._held: list = []

    def lower(self, optimizer: torch.optim.Optimizer, by: float) -> None:
        self.factor *= by
        if id(optimizer) not in self._hooked:
            self._hooked[id(optimizer)] = (optimizer.register_step_pre_hook(self._pre),
                                           optimizer.register_step_post_hook(self._post))

    def _pre(self, optimizer, args, kwargs) -> None:
        self._held = [group["lr"] for group in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * self.factor

    def _post(self, optimizer, args, kwargs) -> None:
        for group, lr in zip(optimizer.param_groups, self._held):
            group["lr"] = lr
        self._held = []

    def remove(self) -> None:
        for pre, post in self._hooked.values():
            pre.remove()
            post.remove()
        self._hooked.clear()
        self.factor = 1.0
