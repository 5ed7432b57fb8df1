"""`nanops train` where yolov5's own loop is hard on protection: a corrupt batch inside the
gradient-accumulation window at an epoch's end, --resume, --evolve, and checkpoints that would not
be finite as saved (float16). Real yolov5 train.py runs on tiny synthetic data, CPU."""
import contextlib
import csv
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml

from nanops.tools.synthetic import write_yolo_dataset
from nanops.yolov5 import transformer_yaml
from nanops.yolov5 import SKIPPED_CSV, run, run_plain

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true"),
]


@contextlib.contextmanager
def corrupt_forwards(*steps: int):
    """The given training forwards (counted from 0 over the whole process run) get an Inf pixel."""
    from yolov5.models.yolo import BaseModel

    seen = {"n": 0}

    def corrupt(module, args):
        if isinstance(module, BaseModel) and module.training and torch.is_grad_enabled():
            if not torch.isfinite(args[0]).all():
                return  # nanops' replay of a batch already corrupted: not a new training forward
            if seen["n"] in steps:
                args[0][0, 1, args[0].shape[2] // 2, args[0].shape[3] // 2] = math.inf
            seen["n"] += 1

    handle = torch.nn.modules.module.register_module_forward_pre_hook(corrupt)
    try:
        yield seen
    finally:
        handle.remove()


def flags(root: Path, data: Path, name: str, **extra) -> dict:
    return dict(data=str(data), cfg=str(transformer_yaml()), weights="", batch_size=4, imgsz=64, workers=0,
                device="cpu", project=str(root / "runs"), name=name, exist_ok=True, noplots=True, **extra)


def finite_model(path: Path) -> bool:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return all(bool(torch.isfinite(t).all()) for part in ("model", "ema") if ckpt.get(part) is not None
               for t in ckpt[part].state_dict().values() if t.is_floating_point())


def val_losses(save_dir: Path) -> list[float]:
    with (save_dir / "results.csv").open() as f:
        rows = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(f)]
    return [sum(float(r[f"val/{k}_loss"]) for k in ("box", "obj", "cls")) for r in rows]


def train_losses(save_dir: Path) -> list[float]:
    with (save_dir / "results.csv").open() as f:
        rows = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(f)]
    return [sum(float(r[f"train/{k}_loss"]) for k in ("box", "obj", "cls")) for r in rows]


def csv_rows(save_dir: Path) -> list[dict]:
    with (save_dir / SKIPPED_CSV).open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def data16(tmp_path_factory):
    root = tmp_path_factory.mktemp("windows")
    return root, write_yolo_dataset(root / "data", num_train=16, num_val=4, size=64)


def test_corrupt_batch_in_the_epoch_end_accumulation_window(data16):
    # 16 images, batch 4: 4 batches an epoch; training forwards 10 and 11 are epoch 2's last two,
    # which the epoch ends before any optimizer step takes them (yolov5 zero_grads at each epoch's
    # start), while their forwards have written NaN into every BatchNorm statistic.
    root, data = data16
    with corrupt_forwards(10, 11):
        plain = run_plain(**flags(root, data, "plain-window", epochs=4))
    with corrupt_forwards(10, 11):
        opt = run(**flags(root, data, "nanops-window", epochs=4))
    ours = Path(opt.save_dir)
    assert not all(math.isfinite(v) for v in val_losses(plain)) and not finite_model(plain / "weights" / "last.pt")
    assert all(math.isfinite(v) for v in val_losses(ours)) and finite_model(ours / "weights" / "last.pt")
    assert all(math.isfinite(v) for v in train_losses(ours))  # the shown mean is over the batches that counted
    batches = [s for s in opt.nanops_skipped if s.kind == "batch"]
    assert [(s.epoch, s.iteration) for s in batches] == [(2, 10), (2, 11)]
    assert all(len(s.images) == 1 and Path(s.images[0]).exists() for s in batches)
    assert all(s.first_nonfinite == "forward of model.0.conv" for s in batches)
    assert [r["kind"] for r in csv_rows(ours)] == ["batch", "batch"]


def test_resume_is_protected_and_appends_to_the_report(data16):
    root, data = data16
    with corrupt_forwards(1):
        first = run(**flags(root, data, "resume", epochs=3, save_period=1))
    epoch0 = Path(first.save_dir) / "weights" / "epoch0.pt"
    assert epoch0.exists() and len(csv_rows(Path(first.save_dir))) == 1
    with corrupt_forwards(2):
        resumed = run(resume=str(epoch0))
    assert Path(resumed.save_dir) == Path(first.save_dir)
    assert [s.kind for s in resumed.nanops_skipped] == ["batch"]
    rows = csv_rows(Path(resumed.save_dir))
    assert len(rows) == 2 and rows[1]["kind"] == "batch"
    assert finite_model(Path(resumed.save_dir) / "weights" / "last.pt")


def test_evolve_reports_every_generation(data16):
    root, data = data16
    # 4 batches a generation (1 epoch): forwards 1 and 5 are each generation's second batch.
    with corrupt_forwards(1, 5):
        opt = run(**flags(root, data, "evolve", epochs=1, evolve=2))
    generations = sorted({s.generation for s in opt.nanops_skipped})
    rows = csv_rows(Path(opt.save_dir))
    assert {r["generation"] for r in rows} == {"0", "1"} and generations == [1]  # the last generation's list
    assert all(r["first_nonfinite"] == "forward of model.0.conv" for r in rows)


def test_a_model_not_finite_in_float16_never_overwrites_a_good_checkpoint(data16, tmp_path, capsys):
    # Adam at lr0=10 (yolov5's Adam default is 0.001): weights and EMA grow past float16's 65504
    # after the first epochs, so yolov5's half-precision checkpoints would hold inf.
    from nanops.cli import main

    root, data = data16
    hyp = yaml.safe_load((transformer_yaml().parents[2] / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    hyp.update(lr0=10.0, warmup_epochs=0)
    hyp_path = tmp_path / "hyp.yaml"
    hyp_path.write_text(yaml.safe_dump(hyp))
    args = ["--data", str(data), "--cfg", str(transformer_yaml()), "--weights", "", "--img", "64", "--batch-size", "4",
            "--workers", "0", "--device", "cpu", "--project", str(root / "runs"), "--name", "fp16", "--exist-ok",
            "--noplots", "--epochs", "4", "--optimizer", "Adam", "--hyp", str(hyp_path)]
    code = main(["train", *args])
    err = capsys.readouterr().err
    weights = root / "runs" / "fp16" / "weights"
    written = sorted(weights.glob("*.pt"))
    assert all(finite_model(p) for p in written), [p.name for p in written]  # never an Inf file
    assert (weights / "last.pt").exists()  # never a run without weights: the start weights at worst
    assert code == 1 and "could not be saved finite" in err and "on disk:" in err  # the exit status says so


def test_an_inf_checkpoint_keeps_the_previous_good_file(tmp_path):
    # The guard on yolov5's torch.save, directly: a good last.pt stays when the next state is inf.
    from nanops.yolov5.saving import guarded_save

    refused = []
    save = guarded_save(torch.save, lambda path, bad, ckpt: refused.append((path, bad)))
    good = torch.nn.Linear(3, 3).half()
    bad = torch.nn.Linear(3, 3).half()
    with torch.no_grad():
        bad.weight[1, 2] = math.inf
    last = tmp_path / "last.pt"
    save({"epoch": 0, "model": good, "ema": good}, last)
    before = last.read_bytes()
    save({"epoch": 1, "model": bad, "ema": good}, last)
    assert last.read_bytes() == before and refused == [(str(last), "model.weight")]
    save({"epoch": 1, "model": good, "ema": bad}, tmp_path / "best.pt")
    assert not (tmp_path / "best.pt").exists() and refused[1] == (str(tmp_path / "best.pt"), "ema.weight")
    torch.save({"not": "a checkpoint"}, tmp_path / "other.pt")  # anything else is saved as torch saves it


def _hyp_file(tmp_path: Path, **values) -> Path:
    hyp = yaml.safe_load((transformer_yaml().parents[2] / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    hyp.update(values)
    path = tmp_path / "hyp.yaml"
    path.write_text(yaml.safe_dump(hyp))
    return path


class _LogRecords(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_sgd_lr0_100_is_warned_at_start_and_stopped_with_its_cause(data16, tmp_path, capsys):
    from nanops.cli import main

    root, data = data16
    hyp = _hyp_file(tmp_path, lr0=100.0)
    # yolov5's logger writes to the stream it found when first imported (maybe an earlier test's
    # capture): its records are collected here instead.
    records = _LogRecords()
    logger = logging.getLogger("yolov5")
    logger.addHandler(records)
    try:
        code = main(["train", "--nanops-on-divergence", "stop", "--data", str(data), "--cfg",
                     str(transformer_yaml()), "--weights", "", "--img", "64", "--batch-size", "4", "--workers", "0",
                     "--device", "cpu", "--project", str(root / "runs"), "--name", "sgd100", "--exist-ok",
                     "--noplots", "--epochs", "4", "--hyp", str(hyp)])
    finally:
        logger.removeHandler(records)
    captured = capsys.readouterr()
    err, everything = captured.err, captured.out + captured.err + "\n".join(records.messages)
    assert code == 3 and "the run is diverging" in err
    assert "Likely cause: lr0=100 with SGD" in err
    assert "hyp warning: lr0=100 with SGD" in everything  # at the start, before any step
    for path in (root / "runs" / "sgd100" / "weights").glob("*.pt"):
        assert finite_model(path)  # whatever was written before the stop is a good checkpoint


def test_adam_lr0_10_diverging_run_is_named_once_and_training_goes_on_when_warned(data16, tmp_path):
    root, data = data16
    opt = run(**flags(root, data, "adam10", epochs=3, optimizer="Adam", hyp=str(_hyp_file(tmp_path, lr0=10.0))))
    assert opt.nanops_divergences, "a diverging Adam run must be reported"
    assert all("Likely cause: lr0=10 with Adam" in m for m in opt.nanops_divergences)
    kinds = [m.split("diverging: ")[1][:12] for m in opt.nanops_divergences]
    assert len(kinds) == len(set(kinds))  # each kind of event once


def test_unknown_nanops_option_is_refused_before_training(capsys):
    from nanops.cli import main

    assert main(["train", "--nanops-on-divergence", "panic"]) == 2
    assert "must be one of warn, stop, rollback" in capsys.readouterr().err
    assert main(["train", "--nanops-whatever"]) == 2
    assert main(["train", "--nanops-on-headroom=loud"]) == 2
    assert "--nanops-on-headroom must be one of warn, promote, stop, off" in capsys.readouterr().err


def test_nanops_own_flags_are_taken_out_before_yolov5s_parser(monkeypatch):
    from nanops.yolov5.cli import own_flags

    monkeypatch.delenv("NANOPS_ON_HEADROOM", raising=False)
    monkeypatch.setenv("NANOPS_ON_DIVERGENCE", "stop")
    assert own_flags(["--epochs", "3", "--nanops-on-headroom", "promote", "--img", "64"]) == (
        ("stop", "promote"), ["--epochs", "3", "--img", "64"])
    assert own_flags(["--nanops-on-divergence=rollback"]) == (("rollback", "warn"), [])


def test_an_epoch_whose_every_batch_was_kept_out_has_no_training_loss_in_results_csv(data16):
    # 4 batches an epoch: training forwards 4-7 are all of epoch 1's.
    root, data = data16
    with corrupt_forwards(4, 5, 6, 7):
        opt = run(**flags(root, data, "kept-out-epoch", epochs=3))
    ours = Path(opt.save_dir)
    losses = train_losses(ours)
    assert math.isfinite(losses[0]) and math.isfinite(losses[2])
    assert math.isnan(losses[1])  # not the 0 yolov5's running mean was left at
    assert all(math.isfinite(v) for v in val_losses(ours)) and finite_model(ours / "weights" / "last.pt")
