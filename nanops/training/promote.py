"""Curing a float16 overflow instead of skipping it forever: the module whose forward output went
non-finite while its inputs were finite runs in float32 from then on, the rest of the model in
AMP's float16.

The promotion lives in two process-wide module hooks and a registry of the promoted modules (by
weak reference): nothing is stored on the model, so checkpoints and pickles stay plain, and a new
process starts unpromoted (a resumed run re-learns it at its first overflow).
"""
from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from .global_hooks import forward_hook, forward_pre_hook

_promoted: weakref.WeakSet = weakref.WeakSet()
_active: dict[int, list] = {}
_handles: list = []


def _cast_up(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    if isinstance(value, tuple):
        return tuple(_cast_up(v) for v in value)
    if isinstance(value, list):
        return [_cast_up(v) for v in value]
    return value


def _pre_hook(module, args):
    if module not in _promoted:
        return None
    device_types = {a.device.type for a in args if isinstance(a, torch.Tensor)} or {"cpu"}
    if not any(torch.is_autocast_enabled(d) for d in device_types):
        return None
    stack = contextlib.ExitStack()
    for d in device_types:
        stack.enter_context(torch.autocast(d, enabled=False))
    _active.setdefault(id(module), []).append(stack)
    return _cast_up(args)  # keyword tensors keep their dtype (rare in module calls)


def _post_hook(module, args, output):
    stacks = _active.get(id(module))
    if stacks:
        stacks.pop().close()
        if not stacks:
            del _active[id(module)]
    return None


def promote(module: nn.Module) -> bool:
    """Runs `module` in float32 under autocast from now on (its 16-bit floating inputs cast up).
    Returns False when it was promoted already."""
    if module in _promoted:
        return False
    if not _handles:
        _handles.append(forward_pre_hook(_pre_hook))
        _handles.append(forward_hook(_post_hook, always_call=True))
    _promoted.add(module)
    return True


def promote_named(model: nn.Module, names) -> list[str]:
    """Promotes the modules of `model` with these qualified names (unknown names are passed over);
    returns the names promoted now, in order, those promoted already left out."""
    modules = dict(model.named_modules())
    return [name for name in dict.fromkeys(names) if name in modules and promote(modules[name])]


def is_promoted(module: nn.Module) -> bool:
    return module in _promoted


def demote_all() -> None:
    """Forgets every promotion (tests; a new training in the same process)."""
    _promoted.clear()


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
