"""`nanops.GradScaler`: torch.amp.GradScaler that also protects steps with AMP off.

torch's GradScaler skips a step whose grads overflowed only when AMP is on; with AMP off
(yolov5 on CPU) a NaN grad goes straight into the weights. This drop-in keeps torch's exact
behaviour with AMP on (scale, unscale_, step, update and state_dict are torch's) and adds:
  * with AMP off, `unscale_` checks every grad for NaN/Inf in one fused pass (no host sync)
    and `step` skips the optimizer step when any is non-finite; `update` changes no scale;
  * `protect(model)`: a skipped step also restores the model's BatchNorm running statistics to
    what they were before the batch (its forward already moved them);
  * `skipped_steps`, `total_steps`, `last_step_skipped` and `on_skip` callbacks for logging and EMA.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch
from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state

from ..ops import nonfinite_flag
from .snapshot import NormBufferSnapshot


def _optimizer_grads(optimizer: torch.optim.Optimizer) -> dict[torch.device, list[torch.Tensor]]:
    grads: dict[torch.device, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is not None:
                grads.setdefault(p.grad.device, []).append(p.grad)
    return grads


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
        self._snapshots: list[NormBufferSnapshot] = []
        self._on_skip: list[Callable[[], None]] = []

    # ---------------------------------------------------------------------------------------
    def protect(self, model: torch.nn.Module) -> GradScaler:
        """Restore `model`'s BatchNorm running statistics on every skipped step. Call it before
        the first forward of training (the snapshot is retaken after each good step)."""
        snapshot = NormBufferSnapshot(model)
        snapshot.take()
        self._snapshots.append(snapshot)
        return self

    def on_skip(self, callback: Callable[[], None]) -> None:
        """`callback()` runs after each skipped step (after the buffers were restored)."""
        self._on_skip.append(callback)

    @property
    def last_step_skipped(self) -> bool:
        """Whether the last `step` skipped the optimizer (read once, in `step`)."""
        return self._last_skipped

    # ---------------------------------------------------------------------------------------
    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """AMP on: torch's unscale_. AMP off: records whether any grad is NaN/Inf (fused, on the
        grads' device, no host sync); the grads are not changed."""
        if self.is_enabled():
            return super().unscale_(optimizer)
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        state["found_inf_per_device"] = {
            device: nonfinite_flag(grads) for device, grads in _optimizer_grads(optimizer).items()
        }
        state["stage"] = OptState.UNSCALED

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """Steps `optimizer` unless its grads hold NaN/Inf (AMP on or off). On a skip, protected
        models get their BatchNorm statistics back and the on_skip callbacks run."""
        state = self._per_optimizer_states[id(optimizer)]
        if self.is_enabled():
            retval = super().step(optimizer, *args, **kwargs)
            skipped = self._found_any_inf(state)  # torch's step has synced on these already
        else:
            if state["stage"] is OptState.STEPPED:
                raise RuntimeError("step() has already been called since the last update().")
            if state["stage"] is OptState.READY:
                self.unscale_(optimizer)
            skipped = self._found_any_inf(state)  # the one host sync of the step
            retval = None if skipped else optimizer.step(*args, **kwargs)
            state["stage"] = OptState.STEPPED
        self.total_steps += 1
        self._last_skipped = skipped
        if skipped:
            self.skipped_steps += 1
            if self.is_enabled():
                self.scale_of_last_skip = self._scale.clone()  # update() is about to back it off
            for snapshot in self._snapshots:
                snapshot.restore()
            for callback in self._on_skip:
                callback()
        else:
            for snapshot in self._snapshots:
                snapshot.take()
        if not self.is_enabled():
            # torch's disabled update() returns at once; the per-optimizer stage is ours to reset.
            self._per_optimizer_states[id(optimizer)] = _refresh_per_optimizer_state()
        return retval

    @staticmethod
    def _found_any_inf(state: dict) -> bool:
        return bool(sum(v.item() for v in state["found_inf_per_device"].values()))

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """AMP on: torch's update (the scale backs off after a skipped step). AMP off: no scale."""
        if self.is_enabled():
            return super().update(new_scale)
        self._per_optimizer_states.clear()
