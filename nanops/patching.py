"""Switching nanops' attention into any built model, and back.

`patch` changes the class of every plain torch.nn.MultiheadAttention in a model to
`PatchedMultiheadAttention` in place: the module object, its Parameters (so optimizers, EMA
copies and DDP built earlier keep working), device, dtype, mode and hooks stay as they are.
A patched module pickles as torch.nn.MultiheadAttention, so checkpoints saved during a
protected run (torch.save of the model, yolov5's and ultralytics' last.pt) load where nanops
is not installed; copy.deepcopy keeps it patched (EMA copies stay protected).
"""
from __future__ import annotations

import copy
import copyreg

from torch import nn

from .nn import MultiheadAttention


class PatchedMultiheadAttention(MultiheadAttention):
    """A torch.nn.MultiheadAttention switched to nanops' forward by `patch`."""

    def __reduce_ex__(self, protocol):
        # Saved as the class it was built as, so the file needs torch only. (copyreg.__newobj__
        # must name the object's own class; the older reconstructor may name another.)
        return copyreg._reconstructor, (nn.MultiheadAttention, object, None), dict(self.__dict__)

    def __deepcopy__(self, memo):
        new = PatchedMultiheadAttention.__new__(PatchedMultiheadAttention)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new


def patch(model: nn.Module) -> int:
    """Switches every torch.nn.MultiheadAttention in `model` (the model itself included) to
    nanops' stable attention, in place; returns how many were switched.

    Subclasses of nn.MultiheadAttention are left alone (their forward may differ). Idempotent.
    Undo with `unpatch` (saved checkpoints need no undo: patched modules pickle as torch's).
    """
    switched = 0
    for module in model.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = PatchedMultiheadAttention
            switched += 1
    return switched


def unpatch(model: nn.Module) -> int:
    """Reverses `patch`: every patched attention becomes torch.nn.MultiheadAttention again (for
    exports and checkpoints that must be plain torch); returns how many were switched back."""
    switched = 0
    for module in model.modules():
        if type(module) is PatchedMultiheadAttention:
            module.__class__ = nn.MultiheadAttention
            switched += 1
    return switched
