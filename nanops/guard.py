"""A guarded optimizer step for yolov5's train loop.

Replaces
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
with one call that fuses unscale + non-finite check + clip, skips the step when any grad is
NaN/Inf (with AMP off too, where yolov5 on CPU would write the NaN into the weights), updates
the scaler and zeroes the grads. One host synchronisation: reading whether to step.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .clip import clip_grad_norm_


@dataclass
class StepResult:
    """total_norm: 0-dim tensor, norm of the (unscaled) grads before clipping.
    skipped: True when the grads held NaN/Inf and the optimizer did not step (skip EMA too)."""

    total_norm: torch.Tensor
    skipped: bool


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _grad_device(params: list[torch.Tensor]) -> torch.device:
    for p in params:
        if p.grad is not None:
            return p.grad.device
    return torch.device("cpu")


def guarded_step(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None = None,
    *,
    max_norm: float = 10.0,
    parameters: Iterable[torch.Tensor] | None = None,
) -> StepResult:
    """Unscale, check, clip, then step or skip; update the scaler; zero the grads.

    Args:
        optimizer: the optimizer to step.
        scaler: a GradScaler, or None / a disabled one (AMP off).
        max_norm: clip threshold (yolov5 uses 10.0).
        parameters: the parameters to clip (default: all of the optimizer's).
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"guarded_step: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"guarded_step: scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    amp = scaler is not None and scaler.is_enabled()
    if amp and scaler._scale is None:
        # Checked before anything changes: torch's unscale_ raises the same after nothing happened.
        raise RuntimeError("guarded_step: the scaler's scale is None. This may indicate your script did not use "
                           "scaler.scale(loss or outputs) earlier in the iteration.")
    params = list(parameters) if parameters is not None else _optimizer_params(optimizer)
    device = _grad_device(params)
    found_inf = torch.zeros(1, device=device)
    inv_scale = scaler._scale.double().reciprocal().float() if amp and scaler._scale is not None else None
    total_norm = clip_grad_norm_(params, max_norm, inv_scale=inv_scale, found_inf=found_inf)
    skipped = bool(found_inf.item())  # the one host sync of the step
    if not skipped:
        optimizer.step()
    if amp:
        # GradScaler.update() reads the found_inf that unscale_ would have recorded; record ours
        # (private state, stable across torch 2.x) so the scale backs off on overflow as usual.
        state = scaler._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = {device: found_inf}
        scaler.update()
    optimizer.zero_grad()
    return StepResult(total_norm=total_norm, skipped=skipped)
