"""One contract for every wing of the protection engine (nanops.training.Session): Guard in a
hand-written loop, yolov5's own train.py under nanops, ultralytics' trainer under protect(),
Lightning under nanops.lightning.Protect, timm's step with nanops.timm.NativeScaler, an Accelerate
loop under nanops.huggingface.protect. A new trainer adapter adds its runner to RUNNERS and must
pass the same tests.

  * one corrupt batch: one skip recorded (SkippedStep naming the first non-finite module), the
    BatchNorm statistics and the EMA at the next batch exactly as before the corrupt one, one CSV
    row, the run finishing with finite weights;
  * a run whose every batch is corrupt from the second on: the divergence policy ("stop") fires.
"""
from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import nanops
from nanops.training import SKIPPED_CSV, DivergenceLimits, Diverged

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true"),
]


def _norm_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.detach().clone() for n, b in model.named_buffers() if "running_" in n}


def _floats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}


@dataclass
class Probe:
    """Counts a model type's training forwards (a replay's, fed the corrupt batch again, not
    counted), keeps the BatchNorm statistics and the EMA as each forward starts, and writes an
    Inf pixel into the batches `corrupt(i)` picks."""

    model_type: type
    corrupt: callable
    ema: callable = lambda: None
    seen: int = 0
    norms: dict = field(default_factory=dict)
    emas: dict = field(default_factory=dict)

    def __call__(self, module, args):
        if not (isinstance(module, self.model_type) and module.training and torch.is_grad_enabled() and args):
            return
        images = args[0]["img"] if isinstance(args[0], dict) else args[0]
        if not torch.isfinite(images).all():
            return  # the replay of a corrupt batch
        ema = self.ema()
        self.norms[self.seen] = _norm_buffers(module)
        self.emas[self.seen] = _floats(ema) if ema is not None else {}
        if self.corrupt(self.seen):
            images[0, 1, images.shape[2] // 2, images.shape[3] // 2] = math.inf
        self.seen += 1

    def installed(self):
        return _Hook(self)


class _Hook:
    def __init__(self, probe):
        self.probe = probe

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.probe)
        return self.probe

    def __exit__(self, *exc):
        self.handle.remove()


@dataclass
class Outcome:
    skips: list
    csv_rows: list
    probe: Probe
    finite: bool
    divergences: list = field(default_factory=list)


def _rows(save_dir: Path) -> list[dict]:
    path = Path(save_dir) / SKIPPED_CSV
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --- the runners: one per wing -------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.head = torch.nn.Linear(4 * 8 * 8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).flatten(1))


def run_guard(tmp_path: Path, corrupt, on_divergence: str = "warn") -> Outcome:
    torch.manual_seed(0)
    model = _Net()
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9),
                                              use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    guard = nanops.Guard(model, optimizer, on_divergence=on_divergence, check_every=2, save_dir=tmp_path)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,))) for _ in range(6)]
    probe = Probe(_Net, corrupt, lambda: ema.module)
    with probe.installed():
        for epoch in range(2):
            for x, y in data:
                x = x.clone()
                loss = torch.nn.functional.cross_entropy(model(x), y)
                loss.backward()
                result = guard.step(locate=lambda: torch.nn.functional.cross_entropy(model(x), y), loss=loss.detach())
                if not result.skipped:
                    ema.update_parameters(model)
            guard.epoch_end()
    guard.finish()
    return Outcome(guard.skips, _rows(tmp_path), probe, all(bool(torch.isfinite(t).all())
                                                           for t in _floats(model).values()),
                   guard.session.divergences)


def _yolov5_data(tmp_path: Path) -> Path:
    from nanops.tools.synthetic import write_yolo_dataset

    return write_yolo_dataset(tmp_path / "data", num_train=8, num_val=4, size=64)


def run_yolov5(tmp_path: Path, corrupt, on_divergence: str = "warn") -> Outcome:
    pytest.importorskip("yolov5")
    from yolov5.models.yolo import BaseModel
    from yolov5.utils.torch_utils import ModelEMA

    from nanops.yolov5 import run, transformer_yaml

    emas = []
    original_init = ModelEMA.__init__

    def remember(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        emas.append(self)

    probe = Probe(BaseModel, corrupt, lambda: emas[-1].ema if emas else None)
    ModelEMA.__init__ = remember
    try:
        with probe.installed():
            opt = run(data=str(_yolov5_data(tmp_path)), cfg=str(transformer_yaml()), weights="", epochs=2, batch_size=4,
                      imgsz=64, workers=0, device="cpu", project=str(tmp_path / "runs"), name="contract",
                      exist_ok=True, noplots=True, nanops_on_divergence=on_divergence)
    finally:
        ModelEMA.__init__ = original_init
    last = torch.load(Path(opt.save_dir) / "weights" / "last.pt", map_location="cpu", weights_only=False)
    finite = all(bool(torch.isfinite(t).all()) for t in _floats(last["ema"] or last["model"]).values())
    return Outcome(opt.nanops_skipped, _rows(opt.save_dir), probe, finite, opt.nanops_divergences)


def run_ultralytics(tmp_path: Path, corrupt, on_divergence: str = "warn") -> Outcome:
    pytest.importorskip("ultralytics")
    from ultralytics import YOLO
    from ultralytics.nn.tasks import BaseModel

    import nanops.ultralytics

    model = YOLO(nanops.ultralytics.YOLOV8N_C3TR)
    protection = nanops.ultralytics.protect(model, on_divergence=on_divergence)
    probe = Probe(BaseModel, corrupt, lambda: model.trainer.ema.ema if getattr(model, "trainer", None) else None)
    with probe.installed():
        # nbs=batch: one optimizer step per batch (ultralytics otherwise accumulates to 64 images)
        model.train(data=str(_yolov5_data(tmp_path)), epochs=2, imgsz=64, batch=4, nbs=4, workers=0, device="cpu",
                    plots=False, amp=False, project=str(tmp_path / "runs"), name="contract", exist_ok=True,
                    verbose=False)
    trainer = model.trainer
    finite = all(bool(torch.isfinite(t).all()) for t in _floats(trainer.model).values())
    return Outcome(protection.skips, _rows(trainer.save_dir), probe, finite, protection.divergences)


def _contract_data():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 2, (4,), generator=g)) for _ in range(6)]


class _Epochs(torch.utils.data.Dataset):
    """Each epoch's batches from its own copies (max_epochs=2 reads the first or second half)."""

    def __init__(self, batches):
        self.batches, self.epoch = batches, -1

    def __len__(self):
        return len(self.batches) // 2

    def __getitem__(self, i):
        if i == 0:
            self.epoch += 1
        return self.batches[self.epoch * len(self) + i]


def run_lightning(tmp_path: Path, corrupt, on_divergence: str = "warn") -> Outcome:
    L = pytest.importorskip("lightning")
    import nanops.lightning

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = _Net()

        def training_step(self, batch, batch_idx):
            x, y = batch  # a fresh copy each epoch (below): the probe's Inf stays in this batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    module = Module()
    protect = nanops.lightning.Protect(on_divergence, check_every=2)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", callbacks=[protect], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    probe = Probe(_Net, corrupt)
    with probe.installed():
        batches = _contract_data()
        fresh = [(x.clone(), y) for _ in range(2) for x, y in batches]  # epoch by epoch, as a loader makes them
        trainer.fit(module, torch.utils.data.DataLoader(_Epochs(fresh), batch_size=None))
    finite = all(bool(torch.isfinite(t).all()) for t in _floats(module).values())
    return Outcome(protect.skips, _rows(tmp_path), probe, finite, protect.divergences)


def run_timm(tmp_path: Path, corrupt, on_divergence: str = "warn") -> Outcome:
    timm_utils = pytest.importorskip("timm.utils")
    import nanops.timm

    torch.manual_seed(0)
    model = _Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    ema = timm_utils.ModelEmaV3(model, decay=0.9)
    loss_scaler = nanops.timm.NativeScaler(model, device="cpu", enabled=False, ema=ema, on_divergence=on_divergence,
                                           check_every=2, save_dir=tmp_path)
    probe = Probe(_Net, corrupt, lambda: ema.module)
    with probe.installed():
        for epoch in range(2):  # timm's train_one_epoch, reduced to its step
            loss_scaler.epoch = epoch
            for i, (x, y) in enumerate(_contract_data()):
                loss = torch.nn.functional.cross_entropy(model(x.clone()), y)
                loss_scaler(loss, optimizer, clip_grad=10.0, clip_mode="norm", parameters=model.parameters())
                optimizer.zero_grad()
                ema.update(model, step=i)
    loss_scaler.close()
    finite = all(bool(torch.isfinite(t).all()) for t in _floats(model).values())
    return Outcome(loss_scaler.skips, _rows(tmp_path), probe, finite, loss_scaler.session.divergences)


def run_accelerate(tmp_path: Path, corrupt, on_divergence: str = "warn") -> Outcome:
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState, GradientState

    import nanops.huggingface

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch.manual_seed(0)
    model = _Net()
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9),
                                              use_buffers=True)
    accelerator = accelerate.Accelerator(cpu=True)
    protection = nanops.huggingface.protect(accelerator, on_divergence=on_divergence, check_every=2,
                                            save_dir=tmp_path)
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    probe = Probe(_Net, corrupt, lambda: ema.module)
    with probe.installed():
        for _ in range(2):
            for x, y in _contract_data():
                loss = torch.nn.functional.cross_entropy(model(x.clone()), y)
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 10.0)
                optimizer.step()
                optimizer.zero_grad()
                if not accelerator.optimizer_step_was_skipped:
                    ema.update_parameters(model)
    protection.close()
    finite = all(bool(torch.isfinite(t).all()) for t in _floats(model).values())
    return Outcome(protection.skips, _rows(tmp_path), probe, finite, protection.divergences)


RUNNERS = {"guard": run_guard, "yolov5": run_yolov5, "ultralytics": run_ultralytics, "lightning": run_lightning,
           "timm": run_timm, "accelerate": run_accelerate}
SLOW = {"yolov5", "ultralytics"}
ROLLBACK = {"guard", "yolov5", "ultralytics"}  # the others refuse "rollback" (a ValueError at construction)


def _wings(names=None):
    return [pytest.param(name, marks=[pytest.mark.slow] if name in SLOW else []) for name in names or RUNNERS]


# --- the contract --------------------------------------------------------------------------------
@pytest.mark.parametrize("wing", _wings())
def test_one_corrupt_batch_is_one_skip_that_leaves_nothing_behind(wing, tmp_path):
    out = RUNNERS[wing](tmp_path, lambda i: i == 1)
    assert len(out.skips) == 1, [str(s) for s in out.skips]
    skip = out.skips[0]
    assert skip.finding is not None and skip.first_nonfinite.startswith("forward of "), skip
    # The state the batch after the corrupt one starts from is the state before it.
    for name, before in out.probe.norms[1].items():
        torch.testing.assert_close(out.probe.norms[2][name], before, rtol=0, atol=0, msg=f"BatchNorm {name}")
    for name, before in out.probe.emas[1].items():
        torch.testing.assert_close(out.probe.emas[2][name], before, rtol=0, atol=0, msg=f"EMA {name}")
    assert len(out.csv_rows) == 1 and out.csv_rows[0]["first_nonfinite"] == skip.first_nonfinite
    assert out.finite
    assert out.divergences == []  # one corrupt batch in a healthy run is no divergence


@pytest.mark.parametrize("wing", _wings())
def test_a_run_that_cannot_take_a_step_any_more_fires_the_divergence_policy(wing, tmp_path, monkeypatch):
    # Two consecutive skipped steps are a run lost (10 by default: these runs are short).
    monkeypatch.setattr("nanops.training.divergence.DivergenceLimits",
                        functools.partial(DivergenceLimits, consecutive_skips=2))
    with pytest.raises(Diverged, match="consecutive skipped steps"):
        RUNNERS[wing](tmp_path, lambda i: i >= 1, on_divergence="stop")


@pytest.mark.parametrize("wing", _wings(ROLLBACK))
def test_rollback_restores_a_healthy_state_and_the_run_trains_on(wing, tmp_path, monkeypatch):
    # Batches 1-3 corrupt: a run of skipped steps (2 make a divergence here), rolled back to the
    # state after the first healthy step; the run then finishes with finite weights.
    monkeypatch.setattr("nanops.training.divergence.DivergenceLimits",
                        functools.partial(DivergenceLimits, consecutive_skips=2))
    out = RUNNERS[wing](tmp_path, lambda i: 1 <= i <= 3, on_divergence="rollback")
    assert any("Rolled back to optimizer step 1's model" in m for m in out.divergences), out.divergences
    assert out.finite
