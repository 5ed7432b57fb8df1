"""Switching nanops' attention into any built model, and back.

`patch` changes the class of every torch.nn.MultiheadAttention in a model (and of every subclass
of it whose forward is torch's, such as RT-DETR variants that only add attributes) to a patched
class in place: the module object, its Parameters (so optimizers, EMA copies and DDP built
earlier keep working), device, dtype, mode and hooks stay as they are. A patched module pickles
as the class it was built as, so checkpoints saved during a protected run (torch.save of the
model, yolov5's and ultralytics' last.pt) load where nanops is not installed; copy.deepcopy keeps
it patched (EMA copies stay protected).

TorchScript cannot compile nanops' attention: scripting a patched model stops with one line
saying to unpatch it first (the scripted model then runs torch's attention) or to trace/export
it, which keeps the stable softmax as standard ops; `patch` refuses a ScriptModule.
"""
from __future__ import annotations

import copy
import copyreg
import warnings

import torch
from torch import nn

from .nn import MultiheadAttention


class PatchedMultiheadAttention(MultiheadAttention):
    """A torch.nn.MultiheadAttention switched to nanops' forward by `patch`."""

    _original_class: type[nn.MultiheadAttention] = nn.MultiheadAttention

    def __reduce_ex__(self, protocol):
        # Saved as the class it was built as, so the file needs torch only. (copyreg.__newobj__
        # must name the object's own class; the older reconstructor may name another.)
        return copyreg._reconstructor, (self._original_class, object, None), dict(self.__dict__)

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "torch.jit.script: nanops' stable attention cannot be scripted. Call nanops.unpatch(model) first (the "
            "scripted model then runs torch's attention), or export with torch.jit.trace / torch.export / ONNX, "
            "which keep the stable softmax as standard ops.")


_PATCHED_CLASSES: dict[type, type] = {nn.MultiheadAttention: PatchedMultiheadAttention}


def _patched_class(cls: type[nn.MultiheadAttention]) -> type[nn.MultiheadAttention]:
    """The patched class for `cls`: nanops' forward first in the MRO, everything else of cls kept."""
    if cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[cls] = type(f"Patched{cls.__name__}", (PatchedMultiheadAttention, cls),
                                     {"_original_class": cls, "__module__": __name__})
    return _PATCHED_CLASSES[cls]


def _patchable(module: nn.Module) -> bool:
    cls = type(module)
    return (isinstance(module, nn.MultiheadAttention) and not isinstance(module, MultiheadAttention)
            and cls.forward is nn.MultiheadAttention.forward)


def patch(model: nn.Module) -> int:
    """Switches every torch.nn.MultiheadAttention in `model` (the model itself included) to
    nanops' stable attention, in place; returns how many were switched.

    Subclasses of nn.MultiheadAttention are switched when their forward is torch's (their other
    methods and attributes stay); those with a forward of their own are left alone, with one
    warning naming them. Idempotent. Undo with `unpatch` (saved checkpoints need no undo:
    patched modules pickle as the class they were built as).
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("nanops.patch: got a torch.jit.ScriptModule, whose code is compiled and cannot be patched; "
                        "patch the eager model (and trace or export it afterwards if needed)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"nanops.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    switched = 0
    own_forward = set()
    for module in model.modules():
        if _patchable(module):
            module.__class__ = _patched_class(type(module))
            switched += 1
        elif isinstance(module, nn.MultiheadAttention) and not isinstance(module, MultiheadAttention):
            own_forward.add(type(module).__qualname__)
    if own_forward:
        warnings.warn(f"nanops.patch: left unpatched the nn.MultiheadAttention subclass(es) {sorted(own_forward)}: "
                      "their forward is their own, not torch's, so nanops cannot stand in for it", stacklevel=2)
    return switched


def unpatch(model: nn.Module) -> int:
    """Reverses `patch`: every patched attention becomes the class it was built as again (for
    exports and checkpoints that must be plain torch); returns how many were switched back."""
    switched = 0
    for module in model.modules():
        if isinstance(module, PatchedMultiheadAttention):
            module.__class__ = module._original_class
            switched += 1
    return switched
