"""The private torch names nanops relies on, in one place: a torch upgrade that moves one of them
touches this file only. Each entry says what it is for and what happens where it is missing."""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend

# scaled_dot_product_attention's own backend choice for a call (flash, memory-efficient, cuDNN or
# math), under the current backend flags: nanops asks it instead of re-deriving torch's rules.
# An int (an SDPBackend value). Present in every torch nanops supports (2.11-2.14).
fused_sdp_choice = torch._fused_sdp_choice

# The one global SDPA flag nanops flips around a masked call (see cudnn_sdp_off).
_get_cudnn_sdp = torch._C._get_cudnn_sdp_enabled
_set_cudnn_sdp = torch._C._set_sdp_use_cudnn

FUSED_BACKENDS = frozenset(int(b.value) for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                                  SDPBackend.CUDNN_ATTENTION))
MATH_BACKEND = int(SDPBackend.MATH.value)


class cudnn_sdp_off:
    """Within: SDPA's cuDNN backend is off (restored after; a no-op where it already was).

    torch.nn.attention.sdpa_kernel does the same for any set of backends, but costs ~20 us per
    use on the host (five flags read and written through Python); this flips one flag, once."""

    __slots__ = ("_was_on",)

    def __enter__(self) -> None:
        self._was_on = _get_cudnn_sdp()
        if self._was_on:
            _set_cudnn_sdp(False)

    def __exit__(self, *exc) -> None:
        if self._was_on:
            _set_cudnn_sdp(True)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether the dispatcher holds a kernel of `op` ("nanops::stable_softmax", "aten::bmm.dtype")
    for `dispatch_key` ("CUDA", "CPU"): a capability test that calls nothing."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(op, dispatch_key)


_module = torch.nn.modules.module
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")


def hooks_observe(modules) -> bool:
    """Whether a hook would see calls of these modules: any process-wide module hook (a missing
    registry counts as present, to be safe), or one of their own forward/backward hooks."""
    for name in _GLOBAL_HOOKS:
        if getattr(_module, name, True):
            return True
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
               for m in modules)
