"""Grad norms and clip coefficients on the device, for grad lists of every layout: dense (the
fused kernels, grouped by device), DTensor shards (FSDP2: summaries gathered over the mesh) and
sparse (torch's norm of the stored values). nanops.clip's public functions stand on these."""
from __future__ import annotations

import math

import torch

from . import _distributed
from ._torch_private import _group_tensors_by_device_and_dtype, foreach_norm
from .ops import all_finite, norm_dtype

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
    counts = torch.stack([n.to(home) for gs in groups.values() for n in foreach_norm(gs, 0)])
    nonfinite = torch.stack([~all_finite(gs).to(home) for gs in groups.values()]).any()
    local = torch.stack([torch.linalg.vector_norm(counts.double(), 0), nonfinite.double()])
    if process_group is not None:
        import torch.distributed as dist

        dist.all_reduce(local, op=dist.ReduceOp.SUM, group=process_group)
    total, nonfinite = local[0], local[1] > 0
    return total.to(dtype), _clip_coef_on_device(total, nonfinite, max_norm, inv_scale, found_inf)


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


def is_special(g: torch.Tensor) -> bool:
    """A grad the fused kernels do not read: sparse (nn.Embedding(sparse=True)) or complex."""
    return g.layout != torch.strided or g.is_complex()


def _clip_with_sparse(grads, norm_type, max_norm, error_if_nonfinite, inv_scale, found_inf, process_group):
    """clip_grad_norm_ over a list holding sparse or complex grads."""
    total_norm, coef = _total_norm_and_coef_with_sparse(grads, norm_type, max_norm, error_if_nonfinite, inv_scale,
                                                        found_inf, process_group)
    dense = [g for g in grads if not is_special(g)]
    for g in grads:
        if is_special(g):
            g.mul_(coef.to(g.dtype))
    for dev, gs in _group_grads(dense)[0].items() if dense else ():
        torch.ops.nanops.scale_tensors_.default(gs, _on(coef, dev))
    return total_norm


def _total_norm_and_coef_with_sparse(grads, norm_type, max_norm, error_if_nonfinite, inv_scale=None,
                                     found_inf=None, process_group=None):
    """The dense real grads through the fused kernels, each sparse grad's norm by torch over its
    coalesced values and each complex grad's by torch (|z|, as torch's clip), combined in float64
    on the device; same semantics as the dense path (a non-finite norm gives coef 1 and sets
    found_inf)."""
    if process_group is not None:
        raise ValueError("clip_grad_norm_: sparse or complex gradients cannot be combined over a process_group")
    p = _check_norm_type(norm_type)
    max_norm = _check_max_norm(max_norm)
    dense = [g for g in grads if not is_special(g)]
    sparse = [g.coalesce() if g.layout == torch.sparse_coo else g for g in grads if is_special(g)]
    home = grads[0].device
    _check_state_tensor(inv_scale, "inv_scale", home)
    _check_state_tensor(found_inf, "found_inf", home)
    scale = inv_scale.double().reshape(()) if inv_scale is not None else None
    values = [(g if g.layout == torch.strided else g.values()).to(torch.complex128 if g.is_complex() else torch.float64)
              * (scale if scale is not None else 1.0) for g in sparse]
    norms = [torch.linalg.vector_norm(v, p).to(home) for v in values]
    if p == 0:  # torch's count of tensors holding a non-zero, as the dense part reports it
        norms = [(n > 0).double() for n in norms]
    nonfinite = torch.stack([~torch.isfinite(v).all().to(home) for v in values]).any()
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
