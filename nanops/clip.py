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
from torch.utils._foreach_utils import _group_tensors_by_device_and_dtype

from . import _distributed
from .ops import _tensor_list, all_finite, norm_dtype

ParamsOrGrads = torch.Tensor | Iterable[torch.Tensor]


def _as_float(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)) or (
            isinstance(value, torch.Tensor) and value.numel() != 1):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def _check_norm_type(norm_type: float) -> float:
    p = _as_float(norm_type, "norm_type")
    if math.isnan(p) or p < 0:
        raise ValueError(f"norm_type must be >= 0 or inf, got {norm_type!r}")
    return p


def _check_max_norm(max_norm: float) -> float:
    value = _as_float(max_norm, "max_norm")
    if math.isnan(value) or value < 0:
        # torch would multiply the grads by a negative or NaN coefficient.
        raise ValueError(f"max_norm must be >= 0 (inf allowed), got {max_norm!r}")
    return value


def _check_state_tensor(t: torch.Tensor | None, name: str, device: torch.device) -> None:
    """inv_scale / found_inf: tensors on the grads' (first) device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a one-element tensor on the grads' device (as GradScaler keeps it), "
                        f"got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the gradients are on {device}")
    # Shape and dtype are checked by the kernels themselves.


def _group_grads(grads: list[torch.Tensor]) -> tuple[dict[torch.device, list[torch.Tensor]], torch.dtype]:
    """Checks the grads (floating point), groups them by device,
    keeping their order within a device, and gives their norm dtype. The grouping is torch's C++
    helper (the one torch's clip_grad_norm_ uses): no Python loop over the grads."""
    keyed = _group_tensors_by_device_and_dtype([grads], with_indices=True)
    bad = [(indices[0], dtype) for (_, dtype), (_, indices) in keyed.items() if not dtype.is_floating_point]
    if bad:
        i, dtype = min(bad, key=lambda item: item[0])
        raise ValueError(f"gradient {i} has dtype {dtype}; only floating-point gradients can be clipped")
    indexed: dict[torch.device, list[tuple[list[int], list[torch.Tensor]]]] = {}
    for (device, _), ((tensors,), indices) in keyed.items():
        indexed.setdefault(device, []).append((indices, tensors))
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for device, parts in indexed.items():
        if len(parts) == 1:
            groups[device] = parts[0][1]
        else:  # mixed dtypes on one device: back to the caller's order
            pairs = sorted((i, t) for indices, tensors in parts for i, t in zip(indices, tensors))
            groups[device] = [t for _, t in pairs]
    return groups, norm_dtype(dtype for _, dtype in keyed)


def _fused(grads: list[torch.Tensor], max_norm: float, p: float, inv_scale, found_inf, scale: bool):
    """The one-call path: torch.ops.nanops.clip_grad_norm_ (checks in C++, norm and coefficient in
    one launch, the scale in a second) -> (total_norm, coef, grad_divisor). None where the grads
    need the general path (several devices, sparse or integer grads, a CPU-only build for CUDA
    grads, arguments of the wrong type): that path handles them or names what is wrong."""
    if not (inv_scale is None or isinstance(inv_scale, torch.Tensor)) or not (
            found_inf is None or isinstance(found_inf, torch.Tensor)):
        return None
    try:
        return torch.ops.nanops.clip_grad_norm_.default(grads, max_norm, p, inv_scale, found_inf, scale)
    except (RuntimeError, TypeError):  # ValueError and NotImplementedError are RuntimeError's kin here
        return None


def _on(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return t if t is None or t.device == device else t.to(device, non_blocking=True)


def _summaries(
    groups: dict[torch.device, list[torch.Tensor]],
    p: float,
    inv_scale: torch.Tensor | None,
    process_group,
) -> torch.Tensor:
    """(k, 5) float64 norm summaries on the first group's device: one row per device (per rank)."""
    rows = [torch.ops.nanops.grad_norm_summary.default(gs, p, _on(inv_scale, dev)) for dev, gs in groups.items()]
    home = next(iter(groups))
    local = rows[0].unsqueeze(0) if len(rows) == 1 else torch.stack([_on(r, home) for r in rows])
    if process_group is None:
        return local
    import torch.distributed as dist

    # Summaries (not norms) travel, so ranks with very different magnitudes still combine
    # without overflow; one all_gather is the only collective.
    world = dist.get_world_size(process_group)
    gathered = [torch.empty_like(local) for _ in range(world)]
    dist.all_gather(gathered, local, group=process_group)
    return torch.cat(gathered)


def _grad_list(parameters: ParamsOrGrads) -> list[torch.Tensor]:
    """Grads of `parameters` (None skipped); warns, as torch does, on an empty generator."""
    is_generator = isinstance(parameters, types.GeneratorType)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = list(parameters)
    if is_generator and not params:
        warnings.warn("`parameters` is an empty generator, no gradient clipping will occur.", stacklevel=3)
    return [p.grad for p in params if p.grad is not None]


def _total_norm_and_coef(
    grads: list[torch.Tensor],
    norm_type: float,
    max_norm: float,
    error_if_nonfinite: bool,
    *,
    inv_scale: torch.Tensor | None = None,
    found_inf: torch.Tensor | None = None,
    process_group=None,
) -> tuple[dict[torch.device, list[torch.Tensor]], torch.Tensor, torch.Tensor]:
    """The grads grouped by device, their total norm and the clip coefficient (both on device).
    The norm is read on the host only for error_if_nonfinite."""
    p = _check_norm_type(norm_type)
    max_norm = _check_max_norm(max_norm)
    groups, dtype = _group_grads(grads)
    home = next(iter(groups))
    _check_state_tensor(inv_scale, "inv_scale", home)
    _check_state_tensor(found_inf, "found_inf", home)
    if process_group is not None and not _is_process_group(process_group):
        raise TypeError(f"process_group must be a torch.distributed ProcessGroup, got {type(process_group).__name__}")
    if p == 0:
        total_norm, coef = _zero_norm_and_coef(groups, dtype, max_norm, inv_scale, found_inf, process_group)
    else:
        summaries = _summaries(groups, p, inv_scale, process_group)
        total_norm, coef = torch.ops.nanops.clip_coef_from_summaries.default(
            summaries, p, max_norm, inv_scale, found_inf, dtype
        )
    _raise_if_nonfinite(total_norm, p, error_if_nonfinite)
    return groups, total_norm, coef


def _raise_if_nonfinite(total_norm: torch.Tensor, p: float, error_if_nonfinite: bool) -> None:
    """torch's error_if_nonfinite (its message, the order as a float): the one host read of the norm."""
    if error_if_nonfinite and not bool(torch.isfinite(total_norm)):
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. The gradients were left unchanged. To skip the error, set `error_if_nonfinite=False`."
        )


def _is_process_group(group) -> bool:
    import torch.distributed as dist

    return dist.is_available() and isinstance(group, dist.ProcessGroup)


def _clip_coef_on_device(total: torch.Tensor, nonfinite: torch.Tensor, max_norm: float,
                         inv_scale: torch.Tensor | None = None, found_inf: torch.Tensor | None = None) -> torch.Tensor:
    """norm_math.h's clip_coef with torch ops, for the paths that form their norm in Python
    (norm_type=0, sparse grads, a given total_norm): float64 inv_scale * min(1, max_norm /
    (norm + 1e-6)), exactly 1 where the grads must stay untouched; sets found_inf there."""
    if found_inf is not None:
        found_inf.copy_(torch.where(nonfinite, torch.ones_like(found_inf), found_inf))
    coef = (max_norm / (total.double() + 1e-6)).clamp(max=1.0)
    if inv_scale is not None:
        coef = coef * inv_scale.double().reshape(())
    return torch.where(nonfinite, torch.ones_like(coef), coef)


def _zero_norm_and_coef(groups, dtype, max_norm, inv_scale, found_inf, process_group):
    """norm_type=0 as torch counts it: the number of tensors holding a non-zero (NaN counts as
    non-zero), not the non-zeros of all tensors; over a process group, the ranks' counts add up
    (each rank counts the tensors it holds, as a world of one counts them). Rare, so plain torch
    ops on the device, and one all_reduce of (count, non-finite) over the group."""
    home = next(iter(groups))
    counts = torch.stack([n.to(home) for gs in groups.values() for n in torch._foreach_norm(gs, 0)])
    nonfinite = torch.stack([~all_finite(gs).to(home) for gs in groups.values()]).any()
    local = torch.stack([torch.linalg.vector_norm(counts.double(), 0), nonfinite.double()])
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)
    total, nonfinite = local[0], local[1] > 0
    return total.to(dtype), _clip_coef_on_device(total, nonfinite, max_norm, inv_scale, found_inf)


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
    if any(g.layout != torch.strided for g in grads):
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


def _clip_sharded(grads, p, max_norm, error_if_nonfinite, inv_scale, found_inf, process_group):
    """clip_grad_norm_ over DTensor grads: the local shards' norm summaries gathered over the
    mesh (each replicated shard counted once), so every rank gets the whole model's norm and
    scales its shards by the same coefficient; a NaN in any rank's shard sets every rank's
    found_inf."""
    shards = _distributed.local_shards(grads, "clip_grad_norm_")
    total_norm, coef = _sharded_norm_and_coef(shards, len(grads), p, max_norm, error_if_nonfinite, inv_scale,
                                              found_inf, process_group if process_group is not None else shards.group)
    for dev, gs in _group_grads(shards.local)[0].items():
        torch.ops.nanops.scale_tensors_.default(gs, _on(coef, dev))
    return total_norm


def _sharded_norm_and_coef(shards, count, p, max_norm, error_if_nonfinite, inv_scale, found_inf, group):
    """The whole (sharded) tensors' norm and clip coefficient, the same on every rank of `group`."""
    if p == 0:
        total_norm, coef = _zero_norm_sharded(shards, count, max_norm, inv_scale, found_inf, group)
        _raise_if_nonfinite(total_norm, p, error_if_nonfinite)
        return total_norm, coef
    # A rank that counts no shard (a replica) still takes part in the gather, with nothing.
    counted = shards.counted or [shards.local[0].new_zeros(0)]
    _, total_norm, coef = _total_norm_and_coef(counted, p, max_norm, error_if_nonfinite, inv_scale=inv_scale,
                                               found_inf=found_inf, process_group=group)
    return total_norm, coef


def _zero_norm_sharded(shards, count, max_norm, inv_scale, found_inf, group):
    """norm_type=0 over `count` DTensors: a tensor counts when any of its shards holds a non-zero."""
    home = shards.local[0].device
    per_tensor = torch.zeros(count, dtype=torch.float64, device=home)
    for i, shard in zip(shards.counted_index, shards.counted):
        per_tensor[i] = torch.count_nonzero(shard)  # NaN counts as non-zero, as torch counts it
    nonfinite = (~all_finite(shards.local)).to(device=home, dtype=torch.float64).reshape(1)
    _distributed.sum_over(per_tensor, group)
    _distributed.agree(nonfinite, group)
    total = (per_tensor > 0).sum().double()
    dtype = norm_dtype({g.dtype for g in shards.local})
    return total.to(dtype), _clip_coef_on_device(total, nonfinite.reshape(()) > 0, max_norm, inv_scale, found_inf)


def _clip_with_sparse(grads, norm_type, max_norm, error_if_nonfinite, inv_scale, found_inf, process_group):
    """clip_grad_norm_ over a list holding sparse grads (e.g. nn.Embedding(sparse=True))."""
    total_norm, coef = _total_norm_and_coef_with_sparse(grads, norm_type, max_norm, error_if_nonfinite, inv_scale,
                                                        found_inf, process_group)
    dense = [g for g in grads if g.layout == torch.strided]
    for g in grads:
        if g.layout != torch.strided:
            g.mul_(coef.to(g.dtype))
    for dev, gs in _group_grads(dense)[0].items() if dense else ():
        torch.ops.nanops.scale_tensors_.default(gs, _on(coef, dev))
    return total_norm


def _total_norm_and_coef_with_sparse(grads, norm_type, max_norm, error_if_nonfinite, inv_scale=None,
                                     found_inf=None, process_group=None):
    """The dense grads through the fused kernels, each sparse grad's norm by torch over its
    coalesced values, combined in float64 on the device; same semantics as the dense path
    (a non-finite norm gives coef 1 and sets found_inf)."""
    if process_group is not None:
        raise ValueError("clip_grad_norm_: sparse gradients cannot be combined over a process_group")
    p = _check_norm_type(norm_type)
    max_norm = _check_max_norm(max_norm)
    dense = [g for g in grads if g.layout == torch.strided]
    sparse = [g.coalesce() if g.layout == torch.sparse_coo else g for g in grads if g.layout != torch.strided]
    home = grads[0].device
    _check_state_tensor(inv_scale, "inv_scale", home)
    _check_state_tensor(found_inf, "found_inf", home)
    scale = inv_scale.double().reshape(()) if inv_scale is not None else None
    values = [g.values().double() * (scale if scale is not None else 1.0) for g in sparse]
    norms = [torch.linalg.vector_norm(v, p).to(home) for v in values]
    if p == 0:  # torch's count of tensors holding a non-zero, as the dense part reports it
        norms = [(n > 0).double() for n in norms]
    nonfinite = torch.stack([~all_finite(v).to(home) for v in values]).any()
    if dense:
        _, dense_norm, _ = _total_norm_and_coef(dense, p, math.inf, False, inv_scale=inv_scale)
        norms.append(dense_norm.double().to(home))
        nonfinite = nonfinite | ~all_finite(dense).to(home)
    stacked = torch.stack(norms)
    total = stacked.sum() if p == 0 else torch.linalg.vector_norm(stacked, p)  # p=0: counts add up
    nonfinite = nonfinite | ~torch.isfinite(total)
    coef = _clip_coef_on_device(total, nonfinite, max_norm, inv_scale, found_inf)
    total_norm = total.to(norm_dtype({g.dtype for g in grads}))
    _raise_if_nonfinite(total_norm, p, error_if_nonfinite)
    return total_norm, coef


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
    if any(t.layout != torch.strided for t in tensor_list):
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
