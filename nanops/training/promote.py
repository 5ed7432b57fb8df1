"""Curing a float16 overflow instead of skipping it forever: the module whose forward output went
non-finite while its inputs were finite runs in float32 from then on, the rest of the model in
AMP's float16.

A promoted module's class is switched in place to a subclass whose forward runs the original one
with autocast off and every 16-bit floating input cast up (positional, keyword, inside lists,
tuples, dicts or dataclasses); `.half()` leaves its weights in float32, so a half-precision
validation copy runs it in float32 too (its output cast back to float16 for the rest). The switch is the model's own: a deepcopy (an EMA) keeps it, a
pickle (a checkpoint) saves the original class, so files load without nanops; no process-wide
hook is involved, and a new process starts unpromoted (a resumed run re-learns it at its first
overflow).
"""
from __future__ import annotations

import dataclasses
import weakref

import torch
from torch import nn

from .._torch_private import pytree
from ..patching import PicklesAsOriginal

_promoted: weakref.WeakSet = weakref.WeakSet()
_CLASSES: dict[type, type] = {}


def _cast_up(value):
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in (torch.float16, torch.bfloat16) else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _cast_up(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    return value


_LOW = (torch.float16, torch.bfloat16)


class _RunsInFloat32(PicklesAsOriginal):
    """The forward of a promoted module (first in its class's MRO), and its float32 weights kept
    through `.half()` / `.to(torch.float16)` (yolov5 and ultralytics validate a half copy)."""

    runs_in_float32 = True  # read by nanops' folded TransformerLayer: run this module as a module

    def forward(self, *args, **kwargs):
        leaves = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        devices = sorted({t.device.type for t in leaves} or {"cpu"})
        original = super().forward
        autocast = any(torch.is_autocast_enabled(d) for d in devices)
        low = next((t.dtype for t in leaves if t.dtype in _LOW), None)
        if not autocast and low is None:
            return original(*args, **kwargs)
        args, kwargs = pytree.tree_map(_cast_up, (args, kwargs))
        out = _without_autocast(devices, original, args, kwargs)
        if autocast:
            return out  # autocast casts it where the next op needs
        # A half model without autocast: the rest of it takes its own dtype back.
        return pytree.tree_map(lambda t: t.to(low) if isinstance(t, torch.Tensor) and t.dtype == torch.float32
                               else t, out)

    def _apply(self, fn, recurse=True):
        def keep_float32(t):
            out = fn(t)
            if t.dtype == torch.float32 and out.dtype in _LOW:
                return t.to(out.device)  # moved as asked, not rounded
            return out
        return super()._apply(keep_float32, recurse)


def _without_autocast(devices: list[str], forward, args, kwargs):
    """forward(*args, **kwargs) with autocast off on every one of `devices` (nested `with`
    blocks, which torch.compile traces, fullgraph included; an ExitStack it cannot)."""
    if not devices:
        return forward(*args, **kwargs)
    with torch.autocast(devices[0], enabled=False):
        return _without_autocast(devices[1:], forward, args, kwargs)


def _promoted_class(cls: type) -> type:
    if cls not in _CLASSES:
        original = getattr(cls, "_original_class", cls)  # a nanops-patched module saves as torch's
        _CLASSES[cls] = type(f"Float32{cls.__name__}", (_RunsInFloat32, cls),
                             {"_original_class": original, "_before_promotion": cls, "__module__": __name__})
    return _CLASSES[cls]


def promote(module: nn.Module) -> bool:
    """Runs `module` in float32 under autocast from now on (its 16-bit floating inputs cast up),
    and in a half model (`.half()` keeps its weights float32; its output is cast back to the
    input's dtype). Returns False when it was promoted already (or cannot be: a TorchScript module)."""
    if is_promoted(module) or isinstance(module, torch.jit.ScriptModule):
        return False
    module.__class__ = _promoted_class(type(module))
    if any(t.dtype in _LOW for t in list(module.parameters()) + list(module.buffers())):
        module.float()  # a half copy (an EMA validated in half): its weights back to float32
    _promoted.add(module)
    return True


def promote_named(model: nn.Module, names) -> list[str]:
    """Promotes the modules of `model` with these qualified names (unknown names are passed over);
    returns the names promoted now, in order, those promoted already left out."""
    modules = dict(model.named_modules())
    return [name for name in dict.fromkeys(names) if name in modules and promote(modules[name])]


def is_promoted(module: nn.Module) -> bool:
    return isinstance(module, _RunsInFloat32)


def demote(module: nn.Module) -> None:
    """Back to the class it had before `promote`."""
    if is_promoted(module):
        module.__class__ = type(module)._before_promotion
    _promoted.discard(module)


def demote_all() -> None:
    """Forgets every promotion made in this process (copies made since keep theirs)."""
    for module in list(_promoted):
        demote(module)


def overflowing_module(model: nn.Module, name: str, forward) -> tuple[str, nn.Module] | None:
    """Where a float16 overflow happened, given `name`, the first module whose forward output a
    replay found non-finite: running `forward()` once more (the step's forward under its
    autocast), the innermost of that module and its parents whose inputs were all finite (the
    overflow may be in a parent's own code, between children: `fc2(relu(fc1(x)) * gain)`).
    None when even the outermost candidate got NaN/Inf in (a corrupt batch, not an overflow);
    the whole model is never a candidate (that is AMP off)."""
    modules = dict(model.named_modules())
    parts = name.split(".") if name else []
    chain = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]  # the module, then its parents
    chain = [c for c in chain if c in modules]
    if not chain:
        return None
    finite: dict[str, bool] = {}
    handles = []
    for candidate in chain:
        def check(mod, args, kwargs, candidate=candidate):
            tensors = [a for a in list(args) + list(kwargs.values())
                       if isinstance(a, torch.Tensor) and a.is_floating_point()]
            finite.setdefault(candidate, all(bool(torch.isfinite(t).all()) for t in tensors))
        handles.append(modules[candidate].register_forward_pre_hook(check, with_kwargs=True))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
    for candidate in chain:
        if finite.get(candidate):
            return candidate, modules[candidate]
    return None
