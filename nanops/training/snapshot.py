"""Snapshots of the buffers a forward pass changes (BatchNorm running statistics).

A skipped optimizer step must leave the model as it was before the batch, but the batch's
forward already moved every BatchNorm's running_mean/running_var/num_batches_tracked (to NaN,
for a corrupt batch). They are small: a fused copy after each good step, and a fused copy
back after a skipped one.
"""
from __future__ import annotations

import torch
from torch import nn

from .._torch_private import NormBase, foreach_copy_


def _flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors end to end, in one op: running statistics are 1-D (cat as they are),
    num_batches_tracked 0-dim (stacked); reshaping each in Python cost more than the copy."""
    dims = {t.dim() for t in tensors}
    if dims == {1}:
        return torch.cat(tensors)
    if dims == {0}:
        return torch.stack(tensors)
    return torch.cat([t.reshape(-1) for t in tensors])


class NormBufferSnapshot:
    """The running statistics of every BatchNorm/InstanceNorm (tracking them) in `model`.

    The copies live in one flat tensor per (device, dtype), so that `settle` keeps or restores
    them all in a few launches. Buffers are looked up at each call, so `model.to(...)`/`.half()`
    after construction is fine."""

    def __init__(self, model: nn.Module):
        self._modules = [m for m in model.modules() if isinstance(m, NormBase) and m.track_running_stats]
        self._layout: list[tuple] = []
        self._flat: dict[tuple, torch.Tensor] = {}     # (device, dtype) -> the copies, end to end
        self._groups: dict[tuple, list[int]] = {}      # (device, dtype) -> buffer indices
        self._copies: list[torch.Tensor] = []          # per-buffer views into the flat copies
        self._seen: list[tuple[dict, str, torch.Tensor]] = []  # (module._buffers, name, buffer) last looked up
        self._by_group: dict[tuple, list[torch.Tensor]] = {}  # (device, dtype) -> the live buffers
        self._live: list[torch.Tensor] = []
        self._group_copies: dict[tuple, list[torch.Tensor]] = {}

    def _buffers(self) -> list[torch.Tensor]:
        """The live buffers. A micro-batch's settle runs this for every BatchNorm of the model:
        the last lookup is kept and checked by identity in the modules' own buffer dicts (a
        `model.to()` or `.half()` replaces the tensors there), not walked through nn.Module's
        attribute lookup again."""
        seen = self._seen
        if seen and all(owner.get(name) is buffer for owner, name, buffer in seen):
            return [buffer for _, _, buffer in seen]
        self._seen = [(m._buffers, name, m._buffers[name]) for m in self._modules
                      for name in ("running_mean", "running_var", "num_batches_tracked")
                      if m._buffers.get(name) is not None]
        return [buffer for _, _, buffer in self._seen]

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
        self._use(buffers)

    def _same_layout(self, buffers: list[torch.Tensor]) -> bool:
        if buffers == self._live:  # list equality tests identity first: the very tensors of the last layout
            return True
        same = [(b.shape, b.dtype, b.device) for b in buffers] == self._layout
        if same:  # new tensors of the same layout (a load_state_dict with assign, say)
            self._use(buffers)
        return same

    def _use(self, buffers: list[torch.Tensor]) -> None:
        self._live = buffers
        self._by_group = {key: [buffers[i] for i in indices] for key, indices in self._groups.items()}
        self._group_copies = {key: [self._copies[i] for i in indices] for key, indices in self._groups.items()}

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
            foreach_copy_(self._copies, buffers)

    def restore(self) -> None:
        """Writes the last snapshot back into the buffers, in place."""
        buffers = self._checked_buffers("restore")
        if buffers:
            with torch.no_grad():
                foreach_copy_(buffers, self._copies)

    def settle(self, found_inf: torch.Tensor) -> None:
        """`restore()` where `found_inf` (a one-element tensor) is non-zero, `take()` where it is
        zero, decided on the device: no host sync, four launches per (device, dtype)."""
        self._checked_buffers("settle")
        with torch.no_grad():
            for key, live in self._by_group.items():
                flat = self._flat[key]
                torch.where(found_inf.to(key[0]).reshape(()) != 0, flat, _flatten(live), out=flat)
                foreach_copy_(live, self._group_copies[key])
