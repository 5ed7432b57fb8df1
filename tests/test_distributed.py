"""Protection across ranks (gloo, 2 CPU processes): DDP, DDP + ZeroRedundancyOptimizer, FSDP2.

Every rank must skip the same steps, or the replicas part for good; each rank restores the
BatchNorm statistics its own batch moved; the result equals a single-process run over the same
global batches with the bad step dropped, bit for bit."""
import socket

import pytest
import torch

import distributed_workers as w

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, fn, *args, world: int = 2) -> list[dict]:
    w.launch(fn, world, free_port(), str(tmp_path), *args)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world)]


def reference(kind: str) -> dict:
    """The single-process run, on one thread as the ranks run (the same reduction order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return w.ddp_reference(kind)
    finally:
        torch.set_num_threads(threads)


def assert_identical(a: dict, b: dict, prefix: str = "") -> None:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys and keys == [k for k in b if k.startswith(prefix)]
    for k in keys:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["sgd", "adam-fused"])
def test_ddp_guard_skips_the_bad_step_on_every_rank_and_matches_dropping_it(tmp_path, kind):
    ranks = run(tmp_path, w.ddp_guard, kind, False)
    expected_skips = [step == w.BAD_STEP for step in range(w.STEPS)]
    for r in ranks:
        assert r["skipped"].tolist() == expected_skips
    # Parameters and optimizer state: the same on both ranks, and DDP's arithmetic in one
    # process with the bad step dropped, bit for bit.
    assert_identical(ranks[0], ranks[1], "optim.")
    expected = reference(kind)
    for rank, r in enumerate(ranks):
        assert_identical({k: v for k, v in r.items() if k.startswith(("model.", "optim."))}, expected[rank])
    # Rank 1's forward of the bad batch wrote Inf/NaN into its BatchNorm statistics; restored.
    for k in (k for k in ranks[1] if k.startswith("after_bad.")):
        assert torch.equal(ranks[1][k], ranks[1][k.replace("after_bad.", "before_bad.")]), k
    # The replay ran on each rank alone (no collective) and the finding names rank 1's module.
    for r in ranks:
        assert r["findings"].tolist() == [[w.BAD_STEP, 1]]
        assert r["finding_names"] == ["forward of 0"]


def test_ddp_guard_agrees_on_a_micro_batch_only_one_rank_saw(tmp_path):
    ranks = run(tmp_path, w.ddp_guard, "sgd", True)
    for r in ranks:
        assert r["skipped"].tolist() == [step == w.BAD_STEP for step in range(w.STEPS)]
    assert_identical(ranks[0], ranks[1], "optim.")
    for k in (k for k in ranks[0] if k.startswith("model.") and "running" not in k and "num_batches" not in k):
        assert torch.equal(ranks[0][k], ranks[1][k]), k


@pytest.mark.parametrize("local_flag", [False, True], ids=["inf-batch", "skip_if-on-one-rank"])
def test_ddp_grad_scaler_skips_on_every_rank(tmp_path, local_flag):
    ranks = run(tmp_path, w.ddp_scaler, local_flag)
    for r in ranks:
        assert r["skipped"].tolist() == [step == w.BAD_STEP for step in range(w.STEPS)]
    assert_identical(ranks[0], ranks[1], "optim.")
    if not local_flag:
        expected = reference("sgd")
        for rank, r in enumerate(ranks):
            assert_identical({k: v for k, v in r.items() if k.startswith(("model.", "optim."))}, expected[rank])


def test_zero_redundancy_optimizer_skips_on_every_rank(tmp_path):
    ranks = run(tmp_path, w.ddp_zero)
    for r in ranks:
        assert r["skipped"].tolist() == [step == w.BAD_STEP for step in range(w.STEPS)]
    weights = [k for k in ranks[0] if k.startswith("model.") and "running" not in k and "num_batches" not in k]
    for k in weights:
        assert torch.isfinite(ranks[0][k]).all() and torch.equal(ranks[0][k], ranks[1][k]), k


def test_fsdp2_norm_counts_and_skips_over_the_mesh(tmp_path):
    ranks = run(tmp_path, w.fsdp2)
    for r in ranks:
        torch.testing.assert_close(r["nanops_norm"], r["torch_norm"], rtol=1e-6, atol=0)
        torch.testing.assert_close(r["clip_norm"], r["torch_norm"], rtol=1e-6, atol=0)
        assert r["nanops_norm_0"].item() == r["torch_norm_0"].item() == 4
        assert torch.equal(r["counts"], r["full_counts"])
        assert r["counts"].sum(0).tolist() == [1, 1, 0]
        assert r["flag"].item() == 1.0 and not r["all_finite"].item()
        assert r["skipped"].tolist() == [False, False, True, False]
        assert r["scaler_skipped"].item()
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert torch.isfinite(ranks[0]["params"]).all()


class _Launched(Exception):
    """Stops YOLO.train in the test process once ultralytics has written its DDP worker files."""


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_ultralytics_ddp_worker_rebuilt_from_its_pickle_is_protected(tmp_path, monkeypatch):
    """ultralytics' multi-GPU launch pickles the trainer's class, args, model and callbacks and has
    each worker rebuild the trainer from them. Build a protected trainer as YOLO.train does, let
    ultralytics write that state, run its worker script under torch.distributed.run in a fresh
    process (world size 1, gloo, CPU) and check the worker: nanops attention, nanops' scaler, the
    corrupt batch's step skipped, the model and its EMA finite."""
    import json
    import os
    import subprocess
    import sys

    from ultralytics import YOLO
    from ultralytics.engine.trainer import BaseTrainer
    from ultralytics.utils.dist import generate_ddp_file

    import nanops.ultralytics
    from nanops.tools.synthetic import write_yolo_dataset
    from test_ultralytics import YOLOV8N_C3TR

    data = write_yolo_dataset(tmp_path / "data", num_train=8, num_val=4, size=64)
    yaml = tmp_path / "yolov8n-c3tr.yaml"
    yaml.write_text(YOLOV8N_C3TR)
    files = {}

    def launch_instead_of_training(trainer):
        files["py"] = generate_ddp_file(trainer)  # ultralytics' own pickling of the trainer
        raise _Launched

    monkeypatch.setattr(BaseTrainer, "train", launch_instead_of_training)
    model = YOLO(str(yaml))
    nanops.ultralytics.protect(model)
    model.add_callback("on_pretrain_routine_start", w.ultralytics_worker_start)
    model.add_callback("on_train_end", w.ultralytics_worker_end)
    with pytest.raises(_Launched):
        model.train(data=str(data), epochs=2, imgsz=64, batch=4, nbs=4, workers=0, device="cpu", plots=False,
                    amp=False, project=str(tmp_path / "runs"), name="ddp", exist_ok=True, verbose=False)
    probe_path = tmp_path / "probe.json"
    env = {**os.environ, "NANOPS_TEST_PROBE": str(probe_path)}
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1",
                               "--master_port", str(free_port()), files["py"]],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        os.remove(files["py"])
        os.remove(os.path.splitext(files["py"])[0] + ".pt")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    probe = json.loads(probe_path.read_text())
    assert probe["pid"] != os.getpid() and probe["world_size"] == 1 and probe["rank"] == 0
    assert probe["attention"] == [True]  # C3TR's attention, nanops' in the worker
    assert probe["scaler"] == "nanops.training.scaler.GradScaler"
    assert probe["skipped_steps"] == 1 and probe["total_steps"] == 4
    assert probe["finite"] and probe["nan_recovery_attempts"] == 0
    rows = (tmp_path / "runs" / "ddp" / "nanops_skipped_steps.csv").read_text().splitlines()
    assert len(rows) == 2 and "forward of model.0.conv" in rows[1], rows


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")
def test_yolov5_train_on_two_ranks_skips_together_and_rank_0_reports(tmp_path):
    """yolov5's own train() under `nanops train`'s protection on 2 gloo ranks (CPU: yolov5 does not
    wrap the model in DDP there, so the ranks' grads are never all-reduced and only nanops'
    agreement makes them skip together). Rank 1's batch is corrupt: both ranks skip that step,
    rank 1's BatchNorm statistics are restored, and rank 0 alone reports it, naming rank 1's
    first non-finite module."""
    from nanops.tools.synthetic import write_yolo_dataset

    data = write_yolo_dataset(tmp_path / "data", num_train=16, num_val=4, size=64)
    ranks = run(tmp_path, w.yolov5_rank, str(data), str(tmp_path / "runs"))
    for r in ranks:
        assert r["skipped"].item() == 1 and r["total"].item() == ranks[0]["total"].item() > 1
        assert r["finite"].item()
    assert ranks[0]["reported"] == [(0, 1, "step", "forward of model.0.conv (rank 1)")]
    assert ranks[1]["reported"] == []  # yolov5 logs from rank 0 only, and so does nanops
    rows = (tmp_path / "runs" / "ddp" / "nanops_skipped_steps.csv").read_text().splitlines()
    assert len(rows) == 2 and "forward of model.0.conv (rank 1)" in rows[1], rows


@pytest.mark.slow
def test_nanops_train_launches_under_torch_distributed_run(tmp_path):
    """The README's multi-GPU command, on a machine without GPUs: torch.distributed.run starts
    `nanops train` on each rank, and each rank ends with yolov5's own device message (exit 2),
    not a traceback of nanops'. (The training itself under DDP needs CUDA, which yolov5 asserts.)"""
    import os
    import subprocess
    import sys

    import nanops

    from nanops.tools.synthetic import write_yolo_dataset
    from nanops.yolov5 import transformer_yaml

    data = write_yolo_dataset(tmp_path / "data", num_train=8, num_val=4, size=64)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "nanops", "train", "--data", str(data), "--weights", "", "--cfg", str(transformer_yaml()), "--img",
         "64", "--batch-size", "4", "--epochs", "1", "--device", "0,1", "--workers", "0", "--project",
         str(tmp_path / "runs"), "--noplots"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode != 0
    # The first rank to fail gets the others stopped by torch.distributed.run: one message at least.
    assert "nanops train: Invalid CUDA '--device 0,1' requested" in out, out[-3000:]
    assert f'File "{os.path.dirname(nanops.__file__)}' not in out, out[-3000:]  # no frame of nanops


def test_ddp_guard_stops_every_rank_when_one_rank_diverges(tmp_path):
    ranks = run(tmp_path, w.ddp_divergence)
    assert [r["stopped_at"].item() for r in ranks] == [3, 3]  # the first read (every 4 steps) after it began


# The trainer adapters over DDP: (worker, package, what every rank's record names).
ADAPTERS = {
    "accelerate": (w.accelerate_ddp, "accelerate", "forward of 0 (rank 1)"),
    "lightning": (w.lightning_ddp, "lightning", "forward of net.0 (rank 1)"),
    "timm": (w.timm_ddp, "timm", "forward of 0 (rank 1)"),
}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
def test_an_adapter_over_ddp_skips_on_every_rank_and_matches_dropping_the_step(tmp_path, adapter):
    worker, package, named = ADAPTERS[adapter]
    pytest.importorskip(package)
    ranks = run(tmp_path, worker, str(tmp_path))
    expected = reference("sgd")
    for rank, r in enumerate(ranks):
        assert r["skipped"].tolist() == [step == w.BAD_STEP for step in range(w.STEPS)]
        assert_identical({k: v for k, v in r.items() if k.startswith(("model.", "optim."))}, expected[rank])
        # Every rank names rank 1's first non-finite module (found by rank 1's own replay).
        assert r["finding_names"] == [named], r["finding_names"]
    rows = (tmp_path / "nanops_skipped_steps.csv").read_text().splitlines()  # written by rank 0 alone
    assert len(rows) == 2 and rows[1].endswith(f",{named}"), rows
    if adapter == "accelerate":
        assert all("MULTI_CPU" in r["distributed_type"] for r in ranks)  # Accelerate's own DDP ran
        # Rank 1's forward of the bad batch wrote Inf into its BatchNorm statistics: put back.
        for k in (k for k in ranks[1] if k.startswith("after_bad.")):
            assert torch.equal(ranks[1][k], ranks[1][k.replace("after_bad.", "before_bad.")]), k
