"""What nanops needs of torch.distributed: sharded (DTensor) tensors seen through their local
shards, one skip decision for every rank, and findings gathered to rank 0.

Under DDP every rank holds the same all-reduced grads, so checks over them already agree. Under
FSDP2 (`fully_shard`) or tensor parallelism the grads are DTensors and each rank holds a shard:
a check over the local shards must be reduced over the mesh before anyone acts on it. Shards are
reduced exactly: a tensor replicated over a mesh dimension counts once (on that dimension's
coordinate 0), so sums over all of the mesh's ranks are the sums over the whole tensors.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.placement_types import Replicate, Shard
except ImportError:  # a torch built without distributed support
    dist = None
    DTensor = ()


def initialized() -> bool:
    return dist is not None and dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 outside torch.distributed)."""
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    """The default group's size (1 outside torch.distributed)."""
    return dist.get_world_size() if initialized() else 1


def is_sharded(t: torch.Tensor) -> bool:
    return bool(DTensor) and isinstance(t, DTensor)


def any_sharded(tensors) -> bool:
    return bool(DTensor) and any(isinstance(t, DTensor) for t in tensors)


@dataclass
class LocalShards:
    """DTensors seen as the local tensors a kernel can read.

    Attributes:
        local: every tensor's local shard, in order (what an in-place op must write).
        counted: the shards whose values this rank contributes to a sum over the mesh (a shard
            replicated over a mesh dimension is counted by that dimension's coordinate 0 only).
        counted_index: for each of `counted`, its index in the input list.
        group: the process group spanning the mesh's ranks.
    """

    local: list[torch.Tensor]
    counted: list[torch.Tensor]
    counted_index: list[int]
    group: object


def _mesh_group(mesh, what: str):
    if mesh.ndim == 1:
        return mesh.get_group()
    if mesh.size() == dist.get_world_size():
        return dist.group.WORLD
    raise ValueError(f"{what}: DTensors on a {mesh.ndim}-dimensional mesh that does not span every rank are not "
                     "supported; call .full_tensor() on them first")


def local_shards(tensors: list[torch.Tensor], what: str) -> LocalShards:
    """The local shards of a list of DTensors on one device mesh (Shard or Replicate placements).
    Plain tensors mixed in, several meshes and Partial placements raise ValueError naming `what`."""
    mesh = coordinate = None
    local, counted, counted_index = [], [], []
    for i, t in enumerate(tensors):
        if not is_sharded(t):
            raise ValueError(f"{what}: tensors[{i}] is a plain tensor among DTensors; pass the tensors of one "
                             "sharded model (all DTensors on one device mesh) or plain tensors only")
        if mesh is None:
            mesh, coordinate = t.device_mesh, t.device_mesh.get_coordinate()
        elif t.device_mesh != mesh:
            raise ValueError(f"{what}: tensors[{i}] lives on another device mesh than tensors[0]")
        counts = True
        for dim, placement in enumerate(t.placements):
            if isinstance(placement, Replicate):
                counts = counts and coordinate[dim] == 0
            elif not isinstance(placement, Shard):
                raise ValueError(f"{what}: tensors[{i}] has placement {placement}; only Shard and Replicate are "
                                 "supported (redistribute a Partial tensor first)")
        shard = t.to_local()
        local.append(shard)
        if counts:
            counted.append(shard)
            counted_index.append(i)
    return LocalShards(local, counted, counted_index, _mesh_group(mesh, what))


def agree(flag: torch.Tensor, group=None) -> torch.Tensor:
    """flag = its maximum over the group's ranks, in place (one small all_reduce, no host sync
    with NCCL: it runs on the stream). Every rank of the group must call it."""
    if initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag


def sum_over(t: torch.Tensor, group) -> torch.Tensor:
    """t = its sum over the group's ranks, in place."""
    if initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def gather_to_all(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` outside torch.distributed). A
    collective: every rank must call it; used on the rare skipped step only."""
    if not initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def is_ddp(model: torch.nn.Module) -> bool:
    """Whether `model` is wrapped in DistributedDataParallel (its grads are all-reduced by the
    backward, so every rank's checks over them agree)."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if is_ddp(model) else model


@contextlib.contextmanager
def local_forward(model: torch.nn.Module):
    """Inside, a DistributedDataParallel `model` forwards straight to its module: a replay that one
    rank runs alone (naming where its batch went non-finite) starts no collective (no buffer
    broadcast, no gradient all-reduce) that the other ranks would never join."""
    if not is_ddp(model):
        yield
        return
    object.__setattr__(model, "forward", model.module.__call__)  # the module's hooks still run
    try:
        yield
    finally:
        object.__delattr__(model, "forward")
