"""`nanops.GradScaler`: torch.amp.GradScaler that also protects steps with AMP off.

torch's GradScaler skips a step whose grads overflowed only when AMP is on; with AMP off
(yolov5 on CPU) a NaN grad goes straight into the weights. This drop-in keeps torch's exact
behaviour with AMP on (scale, unscale_, step, update and state_dict are torch's) and adds:
  * with AMP off, `unscale_` checks every grad for NaN/Inf in one fused pass (no host sync)
    and `step` skips the optimizer step when any is non-finite; `update` changes no scale;
  * `protect(model)`: a skipped step also restores the model's BatchNorm running statistics to
    what they were before the batch (its forward already moved them);
  * `skipped_steps`, `total_steps`, `last_step_skipped` and `on_skip` callbacks for logging and EMA.

Under torch.distributed every rank skips the same steps: DDP's grads are all-reduced and DTensor
grads (FSDP2) are checked over the whole mesh, so found_inf agrees already; `skip_if` flags, which
only their rank sees, are all-reduced with it (one 4-byte all_reduce on the step's stream).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from .. import _distributed
from .._torch_private import (OptState, _refresh_per_optimizer_state, loss_scale, optimizer_state,
                              sparse_values)
from ..ops import nonfinite_flag
from .snapshot import NormBufferSnapshot


def _optimizer_grads(optimizer: torch.optim.Optimizer) -> dict[torch.device, list[torch.Tensor]]:
    """The optimizer's grads by device; a sparse grad is seen through its stored values (its
    NaN/Inf can only be there), as torch's own unscale_ checks them."""
    grads: dict[torch.device, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.layout != torch.strided:
                g = sparse_values(g)
            grads.setdefault(g.device, []).append(g)
    return grads


class _Protected:
    """A protected model's BatchNorm snapshot and which optimizers' steps it follows: it is
    retaken once every optimizer holding the model's parameters has stepped healthy since the
    last take, and restored when any of them skips. So with two models and two optimizers, or
    one model split over two optimizers, a skip always restores the state before the batch,
    whatever the order of the steps."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.snapshot = NormBufferSnapshot(model)
        self.snapshot.take()
        self.params = {id(p) for p in model.parameters()}
        self.owners: set[int] = set()   # optimizers seen stepping this model's parameters
        self.healthy: set[int] = set()  # owners that stepped healthy since the last take


class GradScaler(torch.amp.GradScaler):
    """Same constructor as torch.amp.GradScaler (device first, as torch's)."""

    def __init__(
        self,
        device: str = "cuda",
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        enabled: bool = True,
        *,
        process_group=None,
    ) -> None:
        super().__init__(device, init_scale=init_scale, growth_factor=growth_factor, backoff_factor=backoff_factor,
                         growth_interval=growth_interval, enabled=enabled)
        if not self.is_enabled():
            # torch keeps no per-optimizer state when disabled; ours records found_inf there.
            self._per_optimizer_states = defaultdict(_refresh_per_optimizer_state)
        self.skipped_steps = 0
        self.total_steps = 0
        self._last_skipped = False
        self.scale_of_last_skip: torch.Tensor | None = None  # the loss scale a skipped step's backward used
        self._protected: list[_Protected] = []
        self._optimizer_params: dict[int, tuple[int, set[int]]] = {}  # id -> (param count, param ids)
        self._on_skip: list[Callable[[], None]] = []
        self._skip_flags: list[torch.Tensor] = []  # skip_if() flags for the coming step
        self.process_group = process_group  # grads synchronised by hand over it: found_inf all-reduced

    # ---------------------------------------------------------------------------------------
    def protect(self, model: torch.nn.Module) -> GradScaler:
        """Restore `model`'s BatchNorm running statistics on every skipped step of an optimizer
        holding its parameters. Call it before the first forward of training; any number of
        models and optimizers, in any order of steps (see _Protected)."""
        self._protected.append(_Protected(model))
        return self

    def skip_if(self, flag: torch.Tensor) -> None:
        """The coming step is also skipped where `flag` (a one-element device tensor) is non-zero,
        e.g. a gradient-accumulation window holding a non-finite micro-batch whose grads
        happened to stay finite. Folded into found_inf on the device: no host sync. Under
        torch.distributed call it on every rank for the same steps (a zero flag where nothing
        happened): the flags are all-reduced so that every rank skips together."""
        self._skip_flags.append(flag.detach())

    def _fold_and_agree(self, state: dict) -> None:
        folded = bool(self._skip_flags)
        for device, found in state["found_inf_per_device"].items():
            for flag in self._skip_flags:
                found.add_(flag.to(device=device, dtype=found.dtype).reshape(found.shape))
        self._skip_flags.clear()
        if _distributed.world_size() > 1 and (folded or self.process_group is not None):
            # A rank-local flag (or grads synchronised by hand): every rank must take one decision.
            for found in state["found_inf_per_device"].values():
                _distributed.agree(found, self.process_group)

    def on_skip(self, callback: Callable[[], None]) -> None:
        """`callback()` runs after each skipped step (after the buffers were restored)."""
        self._on_skip.append(callback)

    @property
    def scale_tensor(self) -> torch.Tensor | None:
        """The current loss scale as a (1,) device tensor (no sync, unlike get_scale()); None
        when disabled or before the first scale()."""
        return loss_scale(self) if self.is_enabled() else None

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last `step` skipped the optimizer (read once, in `step`)."""
        return self._last_skipped

    # ---------------------------------------------------------------------------------------
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """AMP on: torch's unscale_. AMP off: records whether any grad is NaN/Inf (fused, on the
        grads' device, no host sync); the grads are not changed, and a second call before the
        step is a no-op (as torch's disabled scaler takes it)."""
        state = optimizer_state(self, optimizer)
        if self.is_enabled():
            super().unscale_(optimizer)
            self._fold_and_agree(state)
            return
        if state["stage"] is OptState.UNSCALED:
            return
        state["found_inf_per_device"] = {
            device: nonfinite_flag(grads) for device, grads in _optimizer_grads(optimizer).items()
        }
        self._fold_and_agree(state)
        state["stage"] = OptState.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """Steps `optimizer` unless its grads hold NaN/Inf (AMP on or off). On a skip, protected
        models get their BatchNorm statistics back and the on_skip callbacks run.

        AMP off with a closure (`step(optimizer, closure)`): the closure runs first, its grads are
        checked, and the optimizer gets that evaluation (a second evaluation, as LBFGS's line
        search makes, runs the closure again). AMP on: closures are refused, as torch refuses them."""
        state = optimizer_state(self, optimizer)
        if self.is_enabled():
            retval = super().step(optimizer, *args, **kwargs)
            skipped = self._found_any_inf(state)  # torch's step has synced on these already
        else:
            retval, skipped = self._disabled_step(optimizer, state, args, kwargs)
        self.total_steps += 1
        self._last_skipped = skipped
        if skipped:
            self.skipped_steps += 1
            if self.is_enabled():
                self.scale_of_last_skip = loss_scale(self).clone()  # update() is about to back it off
        self._settle_snapshots(optimizer, skipped)
        if skipped:
            for callback in self._on_skip:
                callback()
        if not self.is_enabled():
            # torch's disabled update() returns at once; the per-optimizer stage is ours to reset.
            self._per_optimizer_states[id(optimizer)] = _refresh_per_optimizer_state()
        return retval

    def _disabled_step(self, optimizer, state, args, kwargs):
        closure = kwargs.pop("closure", None)
        if closure is None and args and callable(args[0]):
            closure, args = args[0], args[1:]
        if closure is None:
            if state["stage"] is OptState.READY:
                self.unscale_(optimizer)
            skipped = self._found_any_inf(state)  # the one host sync of the step
            return (None if skipped else optimizer.step(*args, **kwargs)), skipped
        with torch.enable_grad():
            loss = closure()
        state["stage"] = OptState.READY  # the closure made new grads: check those
        self.unscale_(optimizer)
        if self._found_any_inf(state):
            return loss, True
        evaluations = 0

        def evaluated():
            nonlocal evaluations
            evaluations += 1
            return loss if evaluations == 1 else closure()

        return optimizer.step(evaluated, *args, **kwargs), False

    def _settle_snapshots(self, optimizer: torch.optim.Optimizer, skipped: bool) -> None:
        if not self._protected:
            return
        key = id(optimizer)
        count = sum(len(g["params"]) for g in optimizer.param_groups)
        cached = self._optimizer_params.get(key)
        if cached is None or cached[0] != count:
            cached = (count, {id(p) for g in optimizer.param_groups for p in g["params"]})
            self._optimizer_params[key] = cached
        owned = [m for m in self._protected if m.params & cached[1]] or self._protected
        for m in owned:
            m.owners.add(key)
            if skipped:
                m.snapshot.restore()
                m.healthy.clear()
            else:
                m.healthy.add(key)
                if m.healthy >= m.owners:
                    m.snapshot.take()
                    m.healthy.clear()

    @staticmethod
    def _found_any_inf(state: dict) -> bool:
        return bool(sum(v.item() for v in state["found_inf_per_device"].values()))

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """AMP on: torch's update (the scale backs off after a skipped step). AMP off: no scale."""
        if self.is_enabled():
            return super().update(new_scale)
        self._per_optimizer_states.clear()
