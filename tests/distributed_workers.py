"""Per-rank programs of tests/test_distributed.py: each runs in a process of a gloo world on the
CPU and saves what the test compares (tensors only, so the test loads them with weights_only)."""
from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

STEPS = 10
BAD_STEP = 3
BATCH = 2  # per rank


def launch(fn, world: int, port: int, out_dir: str, *args) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_entry, args=(fn, world, port, out_dir, args), nprocs=world, join=True)


def _entry(rank, fn, world, port, out_dir, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the same reduction order as the single-process reference
    # A rank left waiting in a collective the others never join (ranks that disagreed on a skip)
    # fails the test within a minute instead of hanging it.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same global batches on every rank and in the reference; rank r reads rows [2r, 2r+2)."""
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(2 * BATCH, 3, 6, 6, generator=g), torch.randn(2 * BATCH, 2, generator=g))
            for _ in range(STEPS)]


def corrupt(x: torch.Tensor, rank: int, step: int, bad_rank: int = 1) -> torch.Tensor:
    if rank == bad_rank and step == BAD_STEP:
        x = x.clone()
        x[0, 0, 0, 0] = float("inf")
    return x


def make_optimizer(params, kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "adam-fused":
        return torch.optim.Adam(params, lr=0.01, fused=True)
    raise ValueError(kind)


def state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor):
                out[f"optim.{i}.{k}"] = v.clone()
    return out


def bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


# --- DDP + Guard ------------------------------------------------------------------------------
def ddp_guard(rank: int, world: int, kind: str, micro_batches: bool) -> dict:
    """Guard over DDP. micro_batches: two micro-batches per step (no_sync on the first), and on
    BAD_STEP rank 1's second micro-batch has a loss that is Inf while its grads stay finite: only
    rank 1 can see it, so the ranks must agree through an all_reduce."""
    import nanops

    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = make_optimizer(ddp.parameters(), kind)
    guard = nanops.Guard(ddp, optimizer, max_norm=10.0)
    skipped, findings, bn_before_bad, bn_after_bad = [], [], None, None
    for step, (x, y) in enumerate(global_batches()):
        xs, ys = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
        if step == BAD_STEP:
            bn_before_bad = bn_buffers(model)
        if micro_batches:
            for i in range(2):
                xi, yi = xs[i:i + 1], ys[i:i + 1]
                sync = contextlib.nullcontext() if i == 1 else ddp.no_sync()
                with sync:
                    loss = torch.nn.functional.mse_loss(ddp(xi), yi)
                    if rank == 1 and step == BAD_STEP and i == 1:
                        loss = loss + torch.tensor(float("inf"))  # no gradient: the grads stay finite
                    loss.backward()
                guard.micro_batch(loss)
            result = guard.step()
        else:
            xs = corrupt(xs, rank, step)
            loss = torch.nn.functional.mse_loss(ddp(xs), ys)
            loss.backward()
            result = guard.step(locate=lambda xs=xs, ys=ys: torch.nn.functional.mse_loss(ddp(xs), ys))
        skipped.append(result.skipped)
        if step == BAD_STEP:
            bn_after_bad = bn_buffers(model)
    for step, finding in guard.findings:
        findings.append((step, finding.module, finding.phase, finding.rank))
    out = state(model, optimizer)
    out["skipped"] = torch.tensor(skipped)
    out.update({f"before_bad.{k}": v for k, v in bn_before_bad.items()})
    out.update({f"after_bad.{k}": v for k, v in bn_after_bad.items()})
    out["findings"] = torch.tensor([[s, r if r is not None else -1] for s, _, _, r in findings] or [[-1, -1]])
    out["finding_names"] = [f"{phase} of {module}" for _, module, phase, _ in findings]
    return out


def ddp_reference(kind: str, world: int = 2) -> dict:
    """What DDP computes, in one process: a replica per rank (its own BatchNorm statistics,
    broadcast_buffers=False), grads divided by the world size and summed (DDP's all-reduce),
    nanops' clip, the step; BAD_STEP dropped."""
    import nanops

    replicas = [make_model() for _ in range(world)]
    params = list(replicas[0].parameters())
    optimizer = make_optimizer(params, kind)
    for step, (x, y) in enumerate(global_batches()):
        if step == BAD_STEP:
            continue
        grads = None
        for r, m in enumerate(replicas):
            loss = torch.nn.functional.mse_loss(m(x[r * BATCH:(r + 1) * BATCH]), y[r * BATCH:(r + 1) * BATCH])
            g = [gi / world for gi in torch.autograd.grad(loss, list(m.parameters()))]
            grads = g if grads is None else [a + b for a, b in zip(grads, g)]
        for p, g in zip(params, grads):
            p.grad = g
        nanops.clip_grad_norm_(params, 10.0)
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for m in replicas[1:]:
                for q, p in zip(m.parameters(), params):
                    q.copy_(p)
    return {r: state(m, optimizer) for r, m in enumerate(replicas)}


# --- DDP + nanops.GradScaler --------------------------------------------------------------------
def ddp_scaler(rank: int, world: int, local_flag: bool) -> dict:
    """nanops.GradScaler("cpu", enabled=False) protecting the DDP model. local_flag: rank 1 alone
    raises a skip_if flag on BAD_STEP (its grads are finite)."""
    import nanops

    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = make_optimizer(ddp.parameters(), "sgd")
    scaler = nanops.GradScaler("cpu", enabled=False).protect(ddp)
    skipped = []
    for step, (x, y) in enumerate(global_batches()):
        xs, ys = x[rank * BATCH:(rank + 1) * BATCH], y[rank * BATCH:(rank + 1) * BATCH]
        if not local_flag:
            xs = corrupt(xs, rank, step)
        scaler.scale(torch.nn.functional.mse_loss(ddp(xs), ys)).backward()
        if local_flag:
            scaler.skip_if(torch.tensor(float(rank == 1 and step == BAD_STEP)))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        skipped.append(scaler.last_step_skipped)
    out = state(model, optimizer)
    out["skipped"] = torch.tensor(skipped)
    return out


# --- DDP + ZeroRedundancyOptimizer ----------------------------------------------------------------
def ddp_zero(rank: int, world: int) -> dict:
    import nanops
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = ZeroRedundancyOptimizer(ddp.parameters(), optimizer_class=torch.optim.Adam, lr=0.01)
    guard = nanops.Guard(ddp, optimizer, max_norm=10.0)
    skipped = []
    for step, (x, y) in enumerate(global_batches()):
        xs, ys = corrupt(x[rank * BATCH:(rank + 1) * BATCH], rank, step), y[rank * BATCH:(rank + 1) * BATCH]
        torch.nn.functional.mse_loss(ddp(xs), ys).backward()
        skipped.append(guard.step().skipped)
    optimizer.consolidate_state_dict(to=0)
    out = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    out["skipped"] = torch.tensor(skipped)
    return out


# --- FSDP2 ------------------------------------------------------------------------------------------
def fsdp2(rank: int, world: int) -> dict:
    """fully_shard on a CPU mesh: the norm against torch's over the same sharded grads, the counts
    against the full grads', and a NaN in a shard only rank 1 holds skipping both ranks."""
    import nanops
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    guard = nanops.Guard(model, optimizer, max_norm=1.0)
    out: dict = {}
    g = torch.Generator().manual_seed(7)
    skipped = []
    for step in range(4):
        x = torch.randn(2 * BATCH, 5, generator=g)[rank * BATCH:(rank + 1) * BATCH]
        model(x).square().sum().backward()
        params = list(model.parameters())
        if step == 0:
            torch_norm = torch.nn.utils.get_total_norm([p.grad for p in params]).full_tensor()
            out["torch_norm"] = torch_norm
            out["nanops_norm"] = nanops.get_total_norm([p.grad for p in params])
            out["nanops_norm_0"] = nanops.get_total_norm([p.grad for p in params], norm_type=0)
            out["torch_norm_0"] = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=0).full_tensor()
        if step == 2:  # a NaN and an Inf in rank 1's shard of the last layer's weight
            if rank == 1:
                params[2].grad.to_local().view(-1)[:2] = torch.tensor([float("nan"), float("inf")])
            out["counts"] = nanops.nonfinite_counts([p.grad for p in params])
            out["full_counts"] = nanops.nonfinite_counts([p.grad.full_tensor() for p in params])
            out["flag"] = nanops.ops.nonfinite_flag([p.grad for p in params])
            out["all_finite"] = nanops.all_finite([p.grad for p in params])
        result = guard.step()
        if step == 0:
            out["clip_norm"] = result.total_norm
        skipped.append(result.skipped)
    out["skipped"] = torch.tensor(skipped)
    out["params"] = torch.cat([p.detach().full_tensor().reshape(-1) for p in model.parameters()])
    # nanops.GradScaler with AMP off over the same sharded grads: a NaN on rank 1 skips both.
    scaler = nanops.GradScaler("cpu", enabled=False)
    model(torch.randn(BATCH, 5)).sum().backward()
    if rank == 1:
        list(model.parameters())[0].grad.to_local().view(-1)[0] = float("nan")
    scaler.step(optimizer)
    out["scaler_skipped"] = torch.tensor(scaler.last_step_skipped)
    return out


# --- ultralytics' DDP worker, rebuilt from its pickled state ---------------------------------------
# Callbacks added to the YOLO object before ultralytics pickles its trainer: they travel to the
# worker as nanops.ultralytics.protect's do, by reference to this importable module.
def ultralytics_worker_start(trainer) -> None:
    """on_pretrain_routine_start in the worker: joins a gloo world (as ultralytics' _setup_ddp does
    on GPUs) and makes the worker's second training batch corrupt."""
    from ultralytics.nn.tasks import BaseModel

    from nanops.tools.inject import inject_nonfinite_input

    if "LOCAL_RANK" not in os.environ:
        return  # the launching process (ultralytics builds its trainer there too)
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_* as torch.distributed.run set them
    injection = inject_nonfinite_input(1, BaseModel)
    injection.__enter__()  # for the worker's lifetime
    trainer.nanops_test_injection = injection


def ultralytics_worker_end(trainer) -> None:
    """on_train_end in the worker: what the test checks, as JSON at $NANOPS_TEST_PROBE."""
    import json

    import nanops.nn
    from nanops._distributed import unwrap

    model = unwrap(trainer.model)
    attention = [isinstance(m, nanops.nn.MultiheadAttention) for m in model.modules()
                 if isinstance(m, torch.nn.MultiheadAttention)]
    floats = [t for m in (model, trainer.ema.ema) for t in m.state_dict().values() if t.is_floating_point()]
    probe = {
        "pid": os.getpid(),
        "world_size": dist.get_world_size() if dist.is_initialized() else 0,
        "rank": int(os.environ.get("RANK", -1)),
        "attention": attention,
        "scaler": f"{type(trainer.scaler).__module__}.{type(trainer.scaler).__qualname__}",
        "skipped_steps": trainer.scaler.skipped_steps,
        "total_steps": trainer.scaler.total_steps,
        "finite": all(bool(torch.isfinite(t).all()) for t in floats),
        "save_dir": str(trainer.save_dir),
        "nan_recovery_attempts": trainer.nan_recovery_attempts,
    }
    with open(os.environ["NANOPS_TEST_PROBE"], "w") as f:
        json.dump(probe, f)


# --- yolov5's train() on two gloo ranks --------------------------------------------------------------
def yolov5_rank(rank: int, world: int, data: str, project: str) -> dict:
    """yolov5's own train() under nanops on this rank, with the globals torch.distributed.run gives
    (LOCAL_RANK, RANK, WORLD_SIZE, read by yolov5.train at import). yolov5's main() asserts a CUDA
    device per rank before calling train(), and train() wraps the model in DDP only on CUDA; here
    main()'s preparation is done on the CPU and train() is called as main() calls it. Rank 1's
    second training forward gets an Inf pixel."""
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world))
    from pathlib import Path

    from nanops.tools.inject import inject_nonfinite_input
    from nanops.yolov5 import transformer_yaml
    from nanops.yolov5.api import options
    from nanops.yolov5.protection import Protection
    from nanops.yolov5.swaps import installed

    opt = options(dict(data=data, cfg=str(transformer_yaml()), weights="", batch_size=4 * world,
                                     imgsz=64, workers=0, device="cpu", project=project, name="ddp", exist_ok=True,
                                     noplots=True, epochs=2))
    import yolov5.train as yolov5_train
    from yolov5.utils.general import check_file, check_yaml, increment_path

    opt.data, opt.cfg, opt.hyp = check_file(opt.data), check_yaml(opt.cfg), check_yaml(opt.hyp)
    opt.weights, opt.project = str(opt.weights), str(opt.project)
    opt.save_dir = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok))
    protection = Protection(opt)
    corrupt_rank_1 = inject_nonfinite_input(1) if rank == 1 else contextlib.nullcontext()
    with installed(protection), corrupt_rank_1:
        yolov5_train.train(opt.hyp, opt, torch.device("cpu"), protection.callbacks())
    model = protection.model
    floats = [t for t in model.state_dict().values() if t.is_floating_point()]
    return {
        "skipped": torch.tensor(protection.scaler.skipped_steps),
        "total": torch.tensor(protection.scaler.total_steps),
        "finite": torch.tensor(all(bool(torch.isfinite(t).all()) for t in floats)),
        "reported": [(s.epoch, s.iteration, s.kind, s.first_nonfinite) for s in protection.skips],
        "save_dir": opt.save_dir,
    }


# --- a divergence only one rank's loss shows ----------------------------------------------------------
def ddp_divergence(rank: int, world: int) -> dict:
    """Guard(on_divergence="stop") over DDP; from step 3 rank 1's loss (the per-rank value the
    watch records) grows 1000x. Both ranks must stop at the same read, or one would hang."""
    import nanops
    from nanops.training.divergence import DivergenceLimits

    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = make_optimizer(ddp.parameters(), "sgd")
    guard = nanops.Guard(ddp, optimizer, on_divergence="stop", check_every=4,
                         limits=DivergenceLimits(settle_steps=1, growth=10.0))
    stopped_at = -1
    for step, (x, y) in enumerate(global_batches()):
        loss = torch.nn.functional.mse_loss(ddp(x[rank * BATCH:(rank + 1) * BATCH]), y[rank * BATCH:(rank + 1) * BATCH])
        loss.backward()
        shown = loss.detach() * (1000.0 if rank == 1 and step >= 3 else 1.0)
        try:
            guard.step(loss=shown)
        except nanops.Diverged:
            stopped_at = step
            break
    return {"stopped_at": torch.tensor(stopped_at)}


# --- an Accelerate loop under nanops.huggingface.protect ---------------------------------------
def accelerate_ddp(rank: int, world: int, out_dir: str) -> dict:
    """The same global batches through Accelerate's own DDP (MULTI_CPU over this gloo group),
    protected; rank 1's BAD_STEP batch has an Inf pixel."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import accelerate
    from accelerate.utils import DistributedDataParallelKwargs

    import nanops.huggingface

    model = make_model()
    accelerator = accelerate.Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(
        broadcast_buffers=False)])  # each rank's BatchNorm statistics its own, as ddp_reference
    protection = nanops.huggingface.protect(accelerator, save_dir=out_dir)
    ddp, optimizer = accelerator.prepare(model, make_optimizer(model.parameters(), "sgd"))
    skipped, bn_before_bad, bn_after_bad = [], None, None
    for step, (x, y) in enumerate(global_batches()):
        xs, ys = corrupt(x[rank * BATCH:(rank + 1) * BATCH], rank, step), y[rank * BATCH:(rank + 1) * BATCH]
        if step == BAD_STEP:
            bn_before_bad = bn_buffers(model)
        accelerator.backward(torch.nn.functional.mse_loss(ddp(xs), ys))
        accelerator.clip_grad_norm_(ddp.parameters(), 10.0)
        optimizer.step()
        optimizer.zero_grad()
        skipped.append(accelerator.optimizer_step_was_skipped)
        if step == BAD_STEP:
            bn_after_bad = bn_buffers(model)
    protection.close()
    out = state(model, optimizer.optimizer)
    out["skipped"] = torch.tensor(skipped)
    out.update({f"before_bad.{k}": v for k, v in bn_before_bad.items()})
    out.update({f"after_bad.{k}": v for k, v in bn_after_bad.items()})
    out["finding_names"] = [f"{s.first_nonfinite}" for s in protection.skips]
    out["distributed_type"] = str(accelerator.distributed_type)
    return out


# --- a Lightning fit under nanops.lightning.Protect ---------------------------------------------
def lightning_ddp(rank: int, world: int, out_dir: str) -> dict:
    """The same global batches through Lightning's own DDP strategy (this gloo group, launched
    outside Lightning), protected; rank 1's BAD_STEP batch has an Inf pixel."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), NODE_RANK="0")
    import lightning as L

    import nanops.lightning

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()
            self.skipped: list[bool] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            self.skipped.append(protect.scaler.last_step_skipped)

        def configure_optimizers(self):
            return make_optimizer(self.parameters(), "sgd")

    class Batches(torch.utils.data.Dataset):  # rank r's rows of each global batch, in order
        def __len__(self):
            return STEPS

        def __getitem__(self, step):
            x, y = global_batches()[step]
            return corrupt(x[rank * BATCH:(rank + 1) * BATCH], rank, step), y[rank * BATCH:(rank + 1) * BATCH]

    protect = nanops.lightning.Protect()
    module = Module()
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=world, strategy=L.pytorch.strategies.DDPStrategy(
        broadcast_buffers=False), gradient_clip_val=10.0, callbacks=[protect], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        default_root_dir=out_dir)
    trainer.fit(module, torch.utils.data.DataLoader(Batches(), batch_size=None))
    out = state(module.net, trainer.optimizers[0])
    out["skipped"] = torch.tensor(module.skipped)
    out["finding_names"] = [s.first_nonfinite for s in protect.skips]
    return out


# --- timm's step with nanops.timm.NativeScaler over DDP -------------------------------------------
def timm_ddp(rank: int, world: int, out_dir: str) -> dict:
    """timm train.py's step over a DDP model (its loss_scaler call, clip 10), protected; rank 1's
    BAD_STEP batch has an Inf pixel."""
    import nanops.timm

    model = make_model()
    ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = make_optimizer(ddp.parameters(), "sgd")
    loss_scaler = nanops.timm.NativeScaler(ddp, device="cpu", enabled=False, save_dir=out_dir)
    skipped = []
    for step, (x, y) in enumerate(global_batches()):
        xs, ys = corrupt(x[rank * BATCH:(rank + 1) * BATCH], rank, step), y[rank * BATCH:(rank + 1) * BATCH]
        loss = torch.nn.functional.mse_loss(ddp(xs), ys)
        loss_scaler(loss, optimizer, clip_grad=10.0, clip_mode="norm", parameters=ddp.parameters())
        optimizer.zero_grad()
        skipped.append(loss_scaler.scaler.last_step_skipped)
    loss_scaler.close()
    out = state(model, optimizer)
    out["skipped"] = torch.tensor(skipped)
    out["finding_names"] = [s.first_nonfinite for s in loss_scaler.skips]
    return out
