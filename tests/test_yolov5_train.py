"""yolov5's own train.py, plain and under `nanops train`, on a tiny synthetic dataset with one
corrupt batch (CPU, 64 px, 8 images, 2 epochs)."""
import csv
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import run_without_nanops
from nanops.tools.synthetic import write_yolo_dataset
from nanops.yolov5 import transformer_yaml
from nanops.tools.inject import inject_nonfinite_input
from nanops.yolov5 import SKIPPED_CSV, run, run_plain

pytestmark = [
    pytest.mark.slow,
    # yolov5 7.0's own deprecated calls (torch.cuda.amp, np.trapz, distutils), not ours.
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true"),
    pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD detected"),
]

CORRUPT_STEP = 1  # the second training forward (epoch 0)


def _train_args(root: Path, data: Path, name: str) -> dict:
    return dict(data=str(data), cfg=str(transformer_yaml()), weights="", epochs=2, batch_size=4, imgsz=64,
                workers=0, device="cpu", project=str(root / "runs"), name=name, exist_ok=True, noplots=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolov5_train")
    data = write_yolo_dataset(root / "data", num_train=8, num_val=4, size=64)
    with inject_nonfinite_input(CORRUPT_STEP):
        plain_dir = run_plain(**_train_args(root, data, "plain"))
    with inject_nonfinite_input(CORRUPT_STEP):
        opt = run(**_train_args(root, data, "nanops"))
    return plain_dir, Path(opt.save_dir), opt, data


def _checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _all_finite(module: torch.nn.Module) -> bool:
    tensors = list(module.state_dict().values())
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.dtype.is_floating_point)


def _bn_buffers_finite(module: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(m.running_mean).all() and torch.isfinite(m.running_var).all())
               for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d))


def _val_losses(save_dir: Path) -> list[float]:
    with (save_dir / "results.csv").open() as f:
        rows = [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]
    return [float(r["val/box_loss"]) + float(r["val/obj_loss"]) + float(r["val/cls_loss"]) for r in rows]


def test_plain_yolov5_train_is_ruined_by_one_corrupt_batch(runs):
    plain_dir, *_ = runs
    ckpt = _checkpoint(plain_dir / "weights" / "last.pt")  # yolov5 stores the EMA as "model" at the end
    assert not _all_finite(ckpt["model"]) or not _bn_buffers_finite(ckpt["model"])
    assert not any(math.isfinite(v) for v in _val_losses(plain_dir))


def test_nanops_train_skips_the_step_and_keeps_the_whole_model_finite(runs):
    _, nanops_dir, opt, _ = runs
    for name in ("last.pt", "best.pt"):
        ckpt = _checkpoint(nanops_dir / "weights" / name)
        assert _all_finite(ckpt["model"]) and _bn_buffers_finite(ckpt["model"])
    assert all(math.isfinite(v) for v in _val_losses(nanops_dir))
    assert len(opt.nanops_skipped) == 1
    skipped = opt.nanops_skipped[0]
    assert (skipped.epoch, skipped.iteration) == (0, CORRUPT_STEP)
    assert skipped.first_nonfinite == "forward of model.0.conv"
    assert skipped.kind == "batch" and len(skipped.images) == 1 and skipped.images[0].endswith(".png")
    with (nanops_dir / SKIPPED_CSV).open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"generation": "0", "epoch": "0", "iteration": str(CORRUPT_STEP), "kind": "batch",
                     "images": skipped.images[0], "first_nonfinite": "forward of model.0.conv"}]


def test_protected_checkpoint_loads_validates_detects_and_exports_without_nanops(runs, tmp_path):
    _, nanops_dir, _, data = runs
    last = nanops_dir / "weights" / "last.pt"
    done = run_without_nanops(f"""
        import torch
        from yolov5.models.experimental import attempt_load
        model = attempt_load({str(last)!r}, device="cpu")
        assert type(model).__module__.startswith("yolov5"), type(model)
        assert not any("nanops" in type(m).__module__ for m in model.modules())
        from yolov5 import val, export
        results = val.run(data={str(data)!r}, weights={str(last)!r}, imgsz=64, batch_size=4, device="cpu",
                          project={str(tmp_path)!r}, name="val", plots=False)[0]
        assert all(v == v for v in results), results
        from yolov5 import detect
        detect.run(weights={str(last)!r}, source={str(data.parent / "images" / "val")!r}, imgsz=(64, 64),
                   device="cpu", project={str(tmp_path)!r}, name="detect", nosave=True)
        export.run(weights={str(last)!r}, include=("torchscript", "onnx"), imgsz=(64, 64), device="cpu")
        print("LOADED-VALIDATED-EXPORTED")
    """, cwd=tmp_path)
    assert "LOADED-VALIDATED-EXPORTED" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    assert last.with_suffix(".torchscript").stat().st_size > 1_000_000
    assert last.with_suffix(".onnx").stat().st_size > 1_000_000


def test_protected_checkpoints_name_no_nanops_module(runs):
    # Nothing of nanops is pickled, by design: the files load where nanops is absent, and
    # moving nanops' modules can never break a checkpoint written earlier.
    _, nanops_dir, *_ = runs
    paths = sorted((nanops_dir / "weights").glob("*.pt"))
    assert paths
    for path in paths:
        globals_ = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        assert any(g.startswith("yolov5.") for g in globals_), globals_  # the walk sees the classes
        assert not [g for g in globals_ if g.split(".")[0] == "nanops"], (path.name, globals_)


def test_protected_checkpoint_is_no_larger_than_plain(runs):
    plain_dir, nanops_dir, *_ = runs
    plain = (plain_dir / "weights" / "last.pt").stat().st_size
    ours = (nanops_dir / "weights" / "last.pt").stat().st_size
    assert ours <= plain * 1.001


def test_cli_bad_flags_and_missing_data_get_yolov5s_messages(tmp_path, capsys):
    from nanops.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["train", "--no-such-flag"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    code = main(["train", "--data", str(tmp_path / "missing.yaml"), "--cfg", str(transformer_yaml()),
                 "--weights", "", "--project", str(tmp_path), "--device", "cpu"])
    assert code == 2
    assert "missing.yaml" in capsys.readouterr().err


class _Evil:
    """What a crafted checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_torch_load_safety_is_kept_and_only_yolov5_checkpoints_pass(runs, tmp_path, monkeypatch, capsys):
    from nanops.cli import main
    from nanops.training import checkpoint_loading

    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" not in os.environ  # nanops no longer turns torch's check off
    _, nanops_dir, _, data = runs
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": _Evil(marker)}, evil)
    code = main(["train", "--data", str(data), "--cfg", str(transformer_yaml()), "--weights", str(evil), "--img", "64",
                 "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--project",
                 str(tmp_path), "--name", "evil", "--noplots"])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert "refusing to load" in err and "posix.system" in err and "NANOPS_TRUST_CHECKPOINTS" in err
    # yolov5's own checkpoints load under the same rule (and resume training from them).
    with checkpoint_loading():
        ckpt = torch.load(nanops_dir / "weights" / "last.pt", map_location="cpu")
    assert type(ckpt["model"]).__name__ == "DetectionModel"
    code = main(["train", "--data", str(data), "--weights", str(nanops_dir / "weights" / "last.pt"), "--img", "64",
                 "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--project",
                 str(tmp_path), "--name", "finetune", "--noplots"])
    assert code == 0 and (tmp_path / "finetune" / "weights" / "last.pt").exists()
    # The documented opt-in, with a warning naming the file.
    monkeypatch.setenv("NANOPS_TRUST_CHECKPOINTS", "1")
    with checkpoint_loading(), pytest.warns(UserWarning, match="evil.pt"):
        torch.load(evil)
    assert marker.exists()
