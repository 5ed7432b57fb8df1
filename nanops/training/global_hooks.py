"""Process-wide module hooks, in one place: every module call of the process passes through them.

nanops uses them where a hook must see a model's modules without being stored on the model (so
that a watched, promoted or protected model deep-copies and pickles as a plain one): watch's
per-module checks, the float16 cure, a wing remembering its trained model's input, the demo's
corrupt batch. Each caller filters by module identity and removes its handle when done; while
any is registered, nanops' folded TransformerLayer runs module by module (a hook may watch).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.hooks import RemovableHandle

_module = torch.nn.modules.module


def forward_pre_hook(hook: Callable) -> RemovableHandle:
    """`hook(module, args)` before every module's forward in the process; may return new args."""
    return _module.register_module_forward_pre_hook(hook)


def forward_hook(hook: Callable, *, always_call: bool = False) -> RemovableHandle:
    """`hook(module, args, output)` after every module's forward; always_call: also when the
    forward raised."""
    return _module.register_module_forward_hook(hook, always_call=always_call)
