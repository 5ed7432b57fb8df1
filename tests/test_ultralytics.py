"""ultralytics' own trainer, plain and with nanops.ultralytics.protect, on a tiny synthetic dataset
with one corrupt batch (CPU, 64 px, 8 images, 2 epochs, a C3TR layer in YOLOv8n)."""
from pathlib import Path

import pytest
import torch

import nanops.ultralytics
from conftest import run_without_nanops
from nanops.tools.inject import inject_nonfinite_input
from nanops.tools.synthetic import write_yolo_dataset

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true"),
]

# YOLOv8n with its last backbone C2f swapped for yolov5s-transformer's C3TR (nn.MultiheadAttention),
# as nanops ships it for the README's ultralytics sample.
YOLOV8N_C3TR = Path(nanops.ultralytics.YOLOV8N_C3TR).read_text()


def _finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in module.state_dict().values() if t.is_floating_point())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ultralytics")
    data = write_yolo_dataset(root / "data", num_train=8, num_val=4, size=64)
    yaml = root / "yolov8n-c3tr.yaml"
    yaml.write_text(YOLOV8N_C3TR)
    return root, data, yaml


def _train(model, root, data, name):
    from ultralytics.nn.tasks import BaseModel

    # nbs=batch: one optimizer step per batch (ultralytics otherwise accumulates to 64 images)
    with inject_nonfinite_input(1, BaseModel):
        model.train(data=str(data), epochs=2, imgsz=64, batch=4, nbs=4, workers=0, device="cpu", plots=False,
                    amp=False, project=str(root / "runs"), name=name, exist_ok=True, verbose=False)
    return model.trainer


def test_plain_ultralytics_cannot_recover_from_one_corrupt_batch(setup):
    from ultralytics import YOLO

    root, data, yaml = setup
    model = YOLO(str(yaml))
    with pytest.raises(RuntimeError, match="NaN persisted"):
        _train(model, root, data, "plain")
    assert not _finite(model.trainer.model)


def test_protected_ultralytics_skips_the_step_and_its_checkpoint_is_plain(setup, tmp_path):
    from ultralytics import YOLO

    import nanops.ultralytics

    root, data, yaml = setup
    model = YOLO(str(yaml))
    protection = nanops.ultralytics.protect(model)
    trainer = _train(model, root, data, "protected")
    assert _finite(trainer.model) and _finite(trainer.ema.ema)
    assert [(s.epoch, s.iteration, s.first_nonfinite) for s in protection.report.steps] == [
        (0, 1, "forward of model.0.conv")]
    assert protection.scaler.skipped_steps == 1 and protection.scaler.total_steps == 4
    assert trainer.nan_recovery_attempts == 0  # no reload of last.pt
    assert (trainer.save_dir / "nanops_skipped_steps.csv").read_text().count("\n") == 2
    last = trainer.save_dir / "weights" / "last.pt"
    done = run_without_nanops(f"""
        import torch
        from ultralytics import YOLO
        model = YOLO({str(last)!r})
        assert not any("nanops" in type(m).__module__ for m in model.model.modules())
        assert any(type(m) is torch.nn.MultiheadAttention for m in model.model.modules())
        assert all(torch.isfinite(t).all() for t in model.model.state_dict().values() if t.is_floating_point())
        model.predict(torch.rand(1, 3, 64, 64), verbose=False)
        print("LOADED-PLAIN")
    """, cwd=tmp_path)
    assert "LOADED-PLAIN" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
