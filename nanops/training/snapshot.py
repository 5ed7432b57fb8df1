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

    The copies live in one flat tensor per (device, dtype), so that `settle` keeps or restores
    them all in a few launches. Buffers are looked up at each call, so `model.to(...)`/`.half()`
    after construction is fine."""

    def __init__(self, model: nn.Module):
        self._modules = [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]
        self._layout: list[tuple] = []
        self._flat: dict[tuple, torch.Tensor] = {}     # (device, dtype) -> the copies, end to end
        self._groups: dict[tuple, list[int]] = {}      # (device, dtype) -> buffer indices
        self._copies: list[torch.Tensor] = []          # per-buffer views into the flat copies

    def _buffers(self) -> list[torch.Tensor]:
        return [b for m in self._modules for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                if b is not None]

    def __len__(self) -> int:
        return len(self._buffers())

    def _allocate(self, buffers: list[torch.Tensor]) -> None:
        self._layout = [(b.shape, b.dtype, b.device) for b in buffers]
        self._groups = {}
        for i, b in enumerate(buffers):
            self._groups.setdefault((b.device, b.dtype), []).append(i)
        self._flat, self._copies = {}, [None] * len(buffers)
        for key, indices in self._groups.items():
            flat = torch.cat([buffers[i].detach().reshape(-1) for i in indices])
            self._flat[key] = flat
            for i, part in zip(indices, flat.split([buffers[i].numel() for i in indices])):
                self._copies[i] = part.view(buffers[i].shape)

    def _same_layout(self, buffers: list[torch.Tensor]) -> bool:
        return [(b.shape, b.dtype, b.device) for b in buffers] == self._layout

    def _checked_buffers(self, caller: str) -> list[torch.Tensor]:
        buffers = self._buffers()
        if not self._same_layout(buffers):
            raise RuntimeError(f"NormBufferSnapshot.{caller}: the model's normalisation buffers changed since take()")
        return buffers

    def take(self) -> None:
        """Copies the current buffers (one fused copy; storage is reused between calls)."""
        buffers = self._buffers()
        if not self._same_layout(buffers):
            self._allocate(buffers)
        elif buffers:
            torch._foreach_copy_(self._copies, buffers)

    def restore(self) -> None:
        """Writes the last snapshot back into the buffers, in place."""
        buffers = self._checked_buffers("restore")
        if buffers:
            with torch.no_grad():
                torch._foreach_copy_(buffers, self._copies)

    def settle(self, found_inf: torch.Tensor) -> None:
        """`restore()` where `found_inf` (a one-element tensor) is non-zero, `take()` where it is
        zero, decided on the device: no host sync, four launches per (device, dtype)."""
        buffers = self._checked_buffers("settle")
        with torch.no_grad():
            for (device, _), indices in self._groups.items():
                current = torch.cat([buffers[i].reshape(-1) for i in indices])
                kept = torch.where(found_inf.to(device).reshape(()) != 0, self._flat[(device, _)], current)
                self._flat[(device, _)].copy_(kept)
                torch._foreach_copy_([buffers[i] for i in indices], [self._copies[i] for i in indices])
