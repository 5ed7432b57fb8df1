"""Snapshots of the buffers a forward pass changes (BatchNorm running statistics).

A skipped optimizer step must leave the model as it was before the batch, but the batch's
forward already moved every BatchNorm's running_mean/running_var/num_batches_tracked (to NaN,
for a corrupt batch). They are small: a fused copy after each good step, and a fused copy
back after a skipped one.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase


class NormBufferSnapshot:
    """The running statistics of every BatchNorm/InstanceNorm (tracking them) in `model`.

    Buffers are looked up at each call, so `model.to(...)`/`.half()` after construction is fine."""

    def __init__(self, model: nn.Module):
        self._modules = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
        self._copies: list[torch.Tensor] = []

    def _buffers(self) -> list[torch.Tensor]:
        return [b for m in self._modules for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                if b is not None]

    def __len__(self) -> int:
        return len(self._buffers())

    def take(self) -> None:
        """Copies the current buffers (one fused copy; storage is reused between calls)."""
        buffers = self._buffers()
        same = len(buffers) == len(self._copies) and all(
            b.shape == c.shape and b.dtype == c.dtype and b.device == c.device for b, c in zip(buffers, self._copies))
        if not same:
            self._copies = [b.detach().clone() for b in buffers]
        elif buffers:
            torch._foreach_copy_(self._copies, buffers)

    def restore(self) -> None:
        """Writes the last snapshot back into the buffers, in place."""
        buffers = self._buffers()
        if len(buffers) != len(self._copies):
            raise RuntimeError("NormBufferSnapshot.restore: the model's normalisation buffers changed since take()")
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, self._copies)
