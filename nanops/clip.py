"""Drop-in replacements for torch.nn.utils.clip_grad_norm_ and its split API.

Differences from torch, all on purpose:
  * the norm is accumulated in float64 and rescaled where needed, so float16 grads whose norm
    exceeds 65504 and float32 grads near 1e20 get a finite norm (returned as float32 for 16-bit
    grads, in the grads' dtype otherwise);
  * a non-finite norm never multiplies the grads by NaN or 0: they are left unchanged (and
    ``found_inf`` is set to 1 when given, GradScaler-style);
  * ``inv_scale`` fuses AMP unscaling into the same passes;
  * no host synchronisation unless ``error_if_nonfinite=True``;
  * ``process_group`` combines sharded grads with one torch.distributed collective; DTensor
    grads (FSDP2) find their mesh's group themselves and give torch's total norm (as a plain
    tensor, the same on every rank).
"""
from __future__ import annotations

import math
import types
import warnings
from collections.abc import Iterable

import torch

from . import _distributed
from .grad_norms import (_check_max_norm, _check_norm_type, _clip_coef_on_device, _clip_sharded, _clip_with_sparse,
                         _group_grads, _on, _raise_if_nonfinite, _sharded_norm_and_coef, _total_norm_and_coef,
                         _total_norm_and_coef_with_sparse, is_special)
from .ops import _tensor_list

ParamsOrGrads = torch.Tensor | Iterable[torch.Tensor]
_PLAIN_GRADS = frozenset({torch.Tensor})


def _fused(grads: list[torch.Tensor], max_norm: float, p: float, inv_scale, found_inf, scale: bool):
    """The one-call path: torch.ops.nanops.clip_grad_norm_ (checks in C++, norm and coefficient in
    one launch, the scale in a second) -> (total_norm, coef, grad_divisor). None where the grads
    need the general path (several devices, sparse or integer grads, inv_scale or found_inf on
    another device, arguments of the wrong type): that path handles them or names what is wrong.

    Which is known only from every grad's device, layout and dtype; reading those in Python
    would cost more than the clip, so the op's checks (in C++, before any kernel runs) tell:
    they raise ValueError, and only ValueError sends the grads down the general path. A
    kernel's failure (out of memory, a device fault: RuntimeError) is never retried."""
    if not (inv_scale is None or type(inv_scale) is torch.Tensor) or not (
            found_inf is None or type(found_inf) is torch.Tensor):
        return None
    if not _PLAIN_GRADS.issuperset(map(type, grads)):  # a tensor subclass: its own dispatch
        return None
    try:
        return torch.ops.nanops.clip_grad_norm_.default(grads, max_norm, p, inv_scale, found_inf, scale)
    except ValueError:
        return None


def _grad_list(parameters: ParamsOrGrads) -> list[torch.Tensor]:
    """Grads of `parameters` (None skipped); warns, as torch does, on an empty generator."""
    is_generator = isinstance(parameters, types.GeneratorType)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = list(parameters)
    if is_generator and not params:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    return [p.grad for p in params if p.grad is not None]


def clip_grad_norm_(
    parameters: ParamsOrGrads,
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    inv_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    process_group=None,
) -> torch.Tensor:
    """Clips the gradient norm of ``parameters`` in place; returns the total norm before clipping.

    Same signature, return value and semantics as torch.nn.utils.clip_grad_norm_ (``foreach`` is
    accepted and ignored: the kernels are always fused), plus:

    Args:
        inv_scale: one-element float32/float64 tensor (GradScaler's 1/scale): grads are unscaled
            by it in the same passes; the returned norm is that of the unscaled grads.
        found_inf: one-element float tensor set to 1 when the grads hold NaN/Inf (or their norm
            overflows); the grads are then left untouched. Never reset to 0.
        process_group: torch.distributed group over which the grads are sharded; every rank gets
            the norm of the whole and scales by the same coefficient.

    Returns:
        0-dim tensor on the grads' (first) device: float32 for float16/bfloat16 grads, else the
        grads' dtype. Non-finite when the grads are.
    """
    grads = _grad_list(parameters)
    if not grads:
        return torch.tensor(0.0)
    p = _check_norm_type(norm_type)
    max_norm = _check_max_norm(max_norm)
    if _distributed.any_sharded(grads):
        return _clip_sharded(grads, p, max_norm, error_if_nonfinite, inv_scale, found_inf, process_group)
    if process_group is None and p != 0:
        fused = _fused(grads, max_norm, p, inv_scale, found_inf, scale=True)
        if fused is not None:
            _raise_if_nonfinite(fused[0], p, error_if_nonfinite)  # grads untouched when non-finite
            return fused[0]
    if any(is_special(g) for g in grads):
        return _clip_with_sparse(grads, norm_type, max_norm, error_if_nonfinite, inv_scale, found_inf, process_group)
    groups, total_norm, coef = _total_norm_and_coef(
        grads, norm_type, max_norm, error_if_nonfinite,
        inv_scale=inv_scale, found_inf=found_inf, process_group=process_group,
    )
    for dev, gs in groups.items():
        torch.ops.nanops.scale_tensors_.default(gs, _on(coef, dev))
    return total_norm


def clip_coef_for_fused_step(
    parameters: ParamsOrGrads,
    max_norm: float,
    *,
    inv_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """clip_grad_norm_ for an optimizer step that takes `grad_scale` (torch's fused SGD/Adam/AdamW
    divide every grad by it in their own kernel): the norm and the coefficient in one launch and
    the grads left as they are; returns (total_norm, grad_divisor), grad_divisor a 0-dim float32
    tensor equal to 1 / (inv_scale * clip factor). Where the one-launch path does not apply (grads
    on several devices, sparse grads), the grads are clipped in place and grad_divisor is None."""
    grads = _grad_list(parameters)
    if grads and not _distributed.any_sharded(grads):
        fused = _fused(grads, _check_max_norm(max_norm), 2.0, inv_scale, found_inf, scale=False)
        if fused is not None:
            return fused[0], fused[2]
    return clip_grad_norm_(grads, max_norm, inv_scale=inv_scale, found_inf=found_inf), None


def get_total_norm(
    tensors: ParamsOrGrads,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
) -> torch.Tensor:
    """Norm of the norms of ``tensors`` (as torch.nn.utils.get_total_norm), overflow-free.

    Args:
        tensors: a tensor or an iterable of tensors (typically gradients); None entries skipped.
    Returns:
        0-dim tensor, float32 for 16-bit inputs, else the inputs' dtype.
    """
    tensor_list = _tensor_list(tensors, "tensors")
    if not tensor_list:
        return torch.tensor(0.0)
    if torch.is_grad_enabled():
        needs = next((i for i, t in enumerate(tensor_list) if t.requires_grad), None)
        if needs is not None:
            # torch's get_total_norm would be differentiable here; ours is not, so say so.
            raise ValueError(f"get_total_norm: tensors[{needs}] requires grad, but nanops' norm has no gradient; "
                             "pass detached tensors (e.g. the .grad of parameters) or use "
                             "torch.nn.utils.get_total_norm")
    p = _check_norm_type(norm_type)
    if _distributed.any_sharded(tensor_list):
        shards = _distributed.local_shards(tensor_list, "get_total_norm")
        return _sharded_norm_and_coef(shards, len(tensor_list), p, math.inf, error_if_nonfinite, None, None,
                                      shards.group)[0]
    fused = _fused(tensor_list, math.inf, p, None, None, scale=False) if p != 0 else None
    if fused is not None:
        _raise_if_nonfinite(fused[0], p, error_if_nonfinite)
        return fused[0]
    if any(is_special(t) for t in tensor_list):
        total_norm, _ = _total_norm_and_coef_with_sparse(tensor_list, norm_type, math.inf, error_if_nonfinite)
    else:
        _, total_norm, _ = _total_norm_and_coef(tensor_list, norm_type, math.inf, error_if_nonfinite)
    return total_norm


def clip_grads_with_norm_(
    parameters: ParamsOrGrads,
    max_norm: float,
    total_norm: torch.Tensor,
    foreach: bool | None = None,
) -> None:
    """Scales the grads of ``parameters`` by min(1, max_norm / (total_norm + 1e-6)), in place.

    As torch.nn.utils.clip_grads_with_norm_, except that a non-finite ``total_norm`` leaves the
    grads unchanged instead of turning them into NaN or 0.
    """
    max_norm = _check_max_norm(max_norm)
    if not isinstance(total_norm, torch.Tensor) or total_norm.numel() != 1:
        raise TypeError("clip_grads_with_norm_: total_norm must be the one-element tensor get_total_norm returns, "
                        f"got {type(total_norm).__name__}"
                        + (f" of shape {tuple(total_norm.shape)}" if isinstance(total_norm, torch.Tensor) else ""))
    if total_norm.device.type == "meta":
        raise ValueError("clip_grads_with_norm_: total_norm is on the meta device and holds no value")
    grads = _grad_list(parameters)
    if not grads:
        return
    if _distributed.is_sharded(total_norm):  # torch's get_total_norm of DTensors: replicated
        total_norm = total_norm.full_tensor()
    if _distributed.any_sharded(grads):
        grads = _distributed.local_shards(grads, "clip_grads_with_norm_").local
    for dev, gs in _group_grads(grads)[0].items():
        norm = total_norm.reshape(()).to(dev, dtype=torch.float64, non_blocking=True)
        torch.ops.nanops.scale_tensors_.default(gs, _clip_coef_on_device(norm, ~torch.isfinite(norm), max_norm))
