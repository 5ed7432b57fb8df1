"""The private torch names nanops relies on, in one place: a torch upgrade that moves one of them
touches this file only. Each entry says what it is for and what happens where it is missing."""
from __future__ import annotations

import sys

import torch
import torch.utils._pytree as pytree  # noqa: F401  (watch: the tensors inside any module output)
from torch.amp.grad_scaler import OptState, _refresh_per_optimizer_state  # noqa: F401  (GradScaler's stages)
from torch.nn.attention import SDPBackend
from torch.nn.modules.batchnorm import _NormBase as NormBase  # noqa: F401  (the modules with running stats)
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype  # noqa: F401  (clip's grouping)

# scaled_dot_product_attention's own backend choice for a call (flash, memory-efficient, cuDNN or
# math), under the current backend flags: nanops asks it instead of re-deriving torch's rules.
# An int (an SDPBackend value). Present in every torch nanops supports (2.11-2.14).
fused_sdp_choice = torch._fused_sdp_choice

# The one global SDPA flag nanops flips around a masked call (see cudnn_sdp_off).
_get_cudnn_sdp = torch._C._get_cudnn_sdp_enabled
_set_cudnn_sdp = torch._C._set_sdp_use_cudnn

# Per-tensor norms of a list in one launch per (device, dtype): clip's and the fallback's norms.
foreach_norm = torch._foreach_norm
# dst[i].copy_(src[i]) for a list, one launch per (device, dtype): BatchNorm snapshots.
foreach_copy_ = torch._foreach_copy_

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


# --- torch.amp.GradScaler's state, read and written by nanops' scaler, Guard and the wings ------

def loss_scale(scaler: torch.amp.GradScaler) -> torch.Tensor | None:
    """The scaler's current loss scale, a (1,) float32 device tensor (None before its first
    scale() call). Read without a sync: get_scale() would copy it to the host."""
    return scaler._scale


def optimizer_state(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> dict:
    """The scaler's per-optimizer record ("stage", "found_inf_per_device") for this step."""
    return scaler._per_optimizer_states[id(optimizer)]


def record_found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer, device: torch.device,
                     found_inf: torch.Tensor) -> None:
    """Records `found_inf` as the one unscale_ would have found, so that scaler.update() backs the
    scale off after a skip as usual (nanops' fused step unscales itself)."""
    optimizer_state(scaler, optimizer)["found_inf_per_device"] = {device: found_inf}


def steps_with_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether optimizer.step() reads `grad_scale`/`found_inf` attributes and skips itself on the
    device (torch's fused optimizers), as GradScaler drives them."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def sparse_values(grad: torch.Tensor) -> torch.Tensor:
    """The stored values of a sparse grad (COO: its NaN/Inf can only be there), as torch's own
    unscale_ checks them."""
    return grad._values() if grad.layout == torch.sparse_coo else grad.values()


def weights_only_globals() -> dict:
    """torch.load(weights_only=True)'s own allow-list (name -> object): what nanops' checkpoint
    policy allows beside module classes."""
    from torch._weights_only_unpickler import _get_allowed_globals

    return dict(_get_allowed_globals())


def onnx_export_flag():
    """A no-argument function telling whether an ONNX export is tracing: the flags
    torch.onnx.is_in_onnx_export() reads, looked up once (it imports two modules per call, 2 us,
    a fifth of a small stable_softmax call); torch's own function where they moved."""
    try:
        from torch.onnx._internal.exporter import _flags
        from torch.onnx._internal.torchscript_exporter._globals import GLOBALS
    except ImportError:
        return torch.onnx.is_in_onnx_export
    return lambda: GLOBALS.in_onnx_export or _flags._is_onnx_exporting


def _optimized_module_type() -> type | None:
    """torch.compile's module wrapper class, or None while torch._dynamo is not imported: then
    nothing can have been compiled (torch.compile and Module.compile import it), and importing it
    only to ask would cost seconds at a run's start."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def is_compiled(model: torch.nn.Module) -> bool:
    """Whether `model` or one of its modules runs through torch.compile (`torch.compile(m)`'s
    wrapper, or `m.compile()`, which sets a private call): module hooks added or removed there
    make Dynamo recompile, so a sampling monitor stays off such models."""
    wrapper = _optimized_module_type()
    if wrapper is None:
        return False
    return any(isinstance(m, wrapper) or getattr(m, "_compiled_call_impl", None) is not None for m in model.modules())


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The module `torch.compile(module)` wrapped (itself when not wrapped): the one whose
    submodules have the names the user knows (no "_orig_mod." prefix)."""
    wrapper = _optimized_module_type()
    while wrapper is not None and isinstance(model, wrapper):
        model = model._orig_mod
    return model
