"""Naming the first non-finite module of a step after the fact, by replaying it.

Healthy steps pay nothing: only when a step was found non-finite (one fused check over the
grads) is it run again on the same inputs, from the same RNG state, with nanops.watch switched
on. The replay changes nothing the training sees: BatchNorm statistics are restored, the RNG
streams continue as if there had been no replay, and the replayed backward goes through
`torch.autograd.grad`, so no `.grad` is written.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..ops import all_finite
from .snapshot import NormBufferSnapshot
from .watch import Finding, watch


def _device_of(inputs: tuple) -> torch.device:
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def cuda_devices(model: nn.Module) -> list[int]:
    """The CUDA device indices of the model's parameters (a walk over the model: not per step)."""
    return sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})


@dataclass
class RngState:
    """The CPU generator and the CUDA generators of a model's devices at one moment (taking it
    copies a few KB on the host and never synchronises with a GPU)."""

    cpu: torch.Tensor
    cuda: dict[int, torch.Tensor]

    @classmethod
    def capture(cls, cuda_devices: Iterable[int] = ()) -> RngState:
        return cls(torch.get_rng_state(), {d: torch.cuda.get_rng_state(d) for d in cuda_devices})

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


@contextlib.contextmanager
def _replaying(model: nn.Module, rng_state: RngState | None):
    """Inside: the model's BatchNorm statistics and every RNG stream are free to change; on exit
    they are as they were on entry. With `rng_state`, the RNG starts from it (the step's own).
    Code compiled with torch.compile runs eagerly inside (torch's public stance): the replay's
    module hooks fire, and nothing is recompiled for them."""
    snapshot = NormBufferSnapshot(model)
    snapshot.take()
    devices = sorted(set(cuda_devices(model)) | set(rng_state.cuda if rng_state else ()))
    try:
        with torch.random.fork_rng(devices=devices), torch.compiler.set_stance("force_eager"), \
                warnings.catch_warnings():
            # torch warns that process-wide hooks also see the torch.compile wrapper: the replay's
            # watch names only the model's own modules.
            warnings.filterwarnings("ignore", message=r"Using `torch\.compile\(module\)` when there are global hooks")
            if rng_state is not None:
                rng_state.restore()
            yield
    finally:
        snapshot.restore()


def locate_forward(model: nn.Module, *inputs, autocast: bool = False) -> Finding | None:
    """Runs `model(*inputs)` once more, in its current mode, with every module's output checked;
    returns the first module whose output held NaN/Inf (phase "forward"), or None when the
    forward is finite (the non-finite value then arose in the loss or the backward).

    Args:
        model: the model of the step (train mode, as it was trained).
        inputs: the step's inputs, e.g. the (N, 3, H, W) float batch.
        autocast: replay under torch.autocast on the inputs' device (AMP runs).
    """
    device = _device_of(inputs)
    with _replaying(model, None), torch.no_grad(), torch.autocast(device.type, enabled=autocast):
        with watch(model, backward=False) as w:
            model(*inputs)
            return w.check()


def _loss_finding(loss: torch.Tensor) -> Finding | None:
    if bool(all_finite([loss.detach()])):
        return None
    flat = loss.detach().float().reshape(-1)
    return Finding("loss", "loss", 0, int(flat.isnan().sum()), int((flat == float("inf")).sum()),
                   int((flat == float("-inf")).sum()))


def locate_step(
    model: nn.Module,
    loss_fn: Callable[[], torch.Tensor],
    *,
    parameters: Iterable[torch.Tensor] | None = None,
    loss_scale: torch.Tensor | float | None = None,
    rng_state: RngState | None = None,
) -> Finding | None:
    """Replays one training step (forward, loss, backward) with every module checked, and returns
    where it first went non-finite: a module's output (phase "forward"), the loss (module "loss",
    phase "loss"), or the gradient flowing into a module's output (phase "backward", the module
    nearest the loss first, as backward meets them). None when the replay is finite throughout.

    Nothing the training sees changes: weights, `.grad`, optimizer state, BatchNorm statistics and
    the RNG streams after the call are as before it.

    Args:
        model: the module whose submodules are named (unwrap DistributedDataParallel first).
        loss_fn: runs the step's forward and loss on the step's batch and returns the loss
            (any shape; summed), e.g. `lambda: compute_loss(model(imgs), targets)[0]`. Put the
            step's autocast inside it when the step used one.
        parameters: what the backward differentiates (default: the model's parameters).
        loss_scale: the AMP loss scale the step's backward used (fp16 grads overflow only at it).
        rng_state: the RNG state at the start of the step (`RngState.capture`), so that dropout
            and other random ops draw what the step drew. Without it they draw afresh.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"locate_step: model must be a torch.nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"locate_step: loss_fn must be callable, got {type(loss_fn).__name__}")
    params = [p for p in (model.parameters() if parameters is None else parameters) if p.requires_grad]
    with _replaying(model, rng_state), torch.enable_grad(), watch(model) as w:
        loss = loss_fn()
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"locate_step: loss_fn must return a tensor, got {type(loss).__name__}")
        found = w.check()
        if found is None:
            found = _loss_finding(loss)
        if found is None and loss.requires_grad and params:
            scaled = loss.sum() * loss_scale if loss_scale is not None else loss.sum()
            torch.autograd.grad(scaled, params, allow_unused=True)  # grads discarded: no .grad written
            found = w.check()
        if found is not None:
            found.step = 0
        return found


def find_overflow(model: nn.Module, finding: Finding | None, loss_fn: Callable[[], torch.Tensor],
                  rng_state: RngState | None = None) -> tuple[str, nn.Module] | None:
    """After a replay under AMP named a module's forward output as the first non-finite value:
    (name, module) of the innermost of it and its parents whose inputs were finite (its own
    16-bit arithmetic overflowed), else None. One more forward of the step, changing nothing the
    training sees."""
    from .promote import overflowing_module

    if finding is None or finding.phase != "forward" or not finding.module:
        return None
    with _replaying(model, rng_state):
        return overflowing_module(model, finding.module, loss_fn)
