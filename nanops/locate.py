"""Naming the first non-finite module of a step after the fact, by replaying its forward.

Healthy steps pay nothing: only when a step was found non-finite (one fused check over the
grads) is its forward run again on the same inputs with nanops.watch switched on. The replay
changes nothing the training sees: BatchNorm statistics are restored, RNG streams are forked,
no gradient is made.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .snapshot import NormBufferSnapshot
from .watch import Finding, watch


def _device_of(inputs: tuple) -> torch.device:
    for x in inputs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


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
    snapshot = NormBufferSnapshot(model)
    snapshot.take()
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.random.fork_rng(devices=rng_devices))
            stack.enter_context(torch.no_grad())
            stack.enter_context(torch.autocast(device.type, enabled=autocast))
            w = stack.enter_context(watch(model, backward=False))
            model(*inputs)
            return w.check()
    finally:
        snapshot.restore()
