"""Checkpoints load without running code from the file: crafted files through every path that
loads one are refused before any of their code runs (the payload's marker file stays absent),
and each payload is shown to be real by what full unpickling does with it."""
import copyreg
import io
import os
import pickle
import sys
import zipfile

import pytest
import torch
import yaml

import nanops
from nanops.tools.synthetic import write_yolo_dataset
from nanops.training.checkpoints import UntrustedCheckpoint, checkpoint_loading, load
from nanops.yolov5 import transformer_yaml


def _evil_cfg(marker) -> dict:
    """yolov5s-transformer's yaml with Python in `activation`, which DetectionModel(cfg) evaluates."""
    cfg = yaml.safe_load(transformer_yaml().read_text())
    cfg["activation"] = f"__import__('pathlib').Path({str(marker)!r}).touch() or nn.SiLU()"
    return cfg


class _ReduceToModel:
    """REDUCE(DetectionModel, (cfg,)): an allow-listed class called with the file's arguments."""

    def __init__(self, marker):
        self.cfg = _evil_cfg(marker)

    def __reduce__(self):
        from yolov5.models.yolo import DetectionModel

        return DetectionModel, (self.cfg,)


class _ReconstructorToModel:
    """copyreg._reconstructor(DetectionModel, DetectionModel, cfg): base.__init__(obj, cfg)."""

    def __init__(self, marker):
        self.cfg = _evil_cfg(marker)

    def __reduce__(self):
        from yolov5.models.yolo import DetectionModel

        return copyreg._reconstructor, (DetectionModel, DetectionModel, self.cfg)


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _save(obj, path):
    torch.save({"model": obj, "epoch": 0}, path)
    return path


def _rename_global(path, old: bytes, new: bytes):
    """The checkpoint at `path` with one GLOBAL's 'module\\nname' replaced (pickle protocol 2
    writes them newline-terminated, so any length goes): a file naming what no pickler would
    write for us without importing it."""
    with zipfile.ZipFile(path) as z:
        records = {n: z.read(n) for n in z.namelist()}
    (data,) = [n for n in records if n.endswith("data.pkl")]
    assert old in records[data]
    records[data] = records[data].replace(old, new)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, content in records.items():
            z.writestr(name, content)
    return path


def placeholder():  # what crafted files name before their GLOBAL is renamed
    return None


class _Placeholder:
    def __reduce__(self):
        return placeholder, ()


PLACEHOLDER = f"{__name__}\nplaceholder\n".encode()


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "pwned"


@pytest.mark.parametrize("payload", [_ReduceToModel, _ReconstructorToModel, _System])
def test_payloads_are_refused_and_really_run_when_trusted(payload, marker, tmp_path, monkeypatch):
    path = _save(payload(marker), tmp_path / "evil.pt")
    with pytest.raises(UntrustedCheckpoint, match="refusing to load .*evil.pt.*NANOPS_TRUST_CHECKPOINTS=1"):
        load(path)
    assert not marker.exists()
    monkeypatch.setenv("NANOPS_TRUST_CHECKPOINTS", "1")  # the payload is real: full pickle runs it
    with pytest.warns(UserWarning, match="evil.pt"):
        load(path)
    assert marker.exists()


@pytest.mark.parametrize("name", [b"builtins\ngetattr\n", b"builtins\neval\n", b"builtins\nexec\n",
                                  b"os\nsystem\n", b"subprocess\nPopen\n", b"nanops.__main__\nmain\n",
                                  b"torch.nn.modules.module\nregister_module_forward_hook\n"])
def test_globals_that_run_code_are_refused_by_name(name, tmp_path):
    path = _rename_global(_save(_Placeholder(), tmp_path / "evil.pt"), PLACEHOLDER, name)
    module, attribute = name.decode().split()
    with pytest.raises(UntrustedCheckpoint, match=f"{module}.{attribute}"):
        load(path)


def test_naming_a_module_imports_nothing(marker, tmp_path, monkeypatch):
    # A package in the working directory, as under `python -m nanops`: importing it would run it.
    package = tmp_path / "work" / "models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    (package / "evil.py").write_text("import torch\nclass Thing(torch.nn.Module):\n    pass\n")
    monkeypatch.chdir(package.parent)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, "models", raising=False)
    before = set(sys.modules)
    for name in (b"models.evil\nThing\n", b"nanops.__main__\nmain\n", b"ultralytics.nn.autobackend\nAutoBackend\n"):
        path = _rename_global(_save(_Placeholder(), tmp_path / "evil.pt"), PLACEHOLDER, name)
        with pytest.raises(UntrustedCheckpoint):
            load(path)
    assert not marker.exists() and "models" not in sys.modules
    assert not {m for m in set(sys.modules) - before if m.startswith(("nanops.__main__", "models"))}


def test_a_library_class_own_setstate_is_not_run(marker, tmp_path, monkeypatch):
    import nanops.nn

    class Sneaky(torch.nn.Module):
        def __setstate__(self, state):
            marker.touch()
            super().__setstate__(state)

    Sneaky.__module__, Sneaky.__qualname__ = "nanops.nn", "Sneaky"
    monkeypatch.setattr(nanops.nn, "Sneaky", Sneaky, raising=False)
    path = _save(Sneaky(), tmp_path / "sneaky.pt")
    loaded = load(path)
    assert type(loaded["model"]) is Sneaky and not marker.exists()
    torch.load(path, weights_only=False)  # plain pickle does run it: the check above can fail
    assert marker.exists()


def test_real_checkpoints_load_yolov5_ultralytics_rtdetr_and_patched(tmp_path):
    from ultralytics import RTDETR, YOLO

    from nanops.yolov5 import build_transformer_model

    model = build_transformer_model(num_classes=1)
    nanops.patch(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 3, 64, 64))[0].sum().backward()
    optimizer.step()
    import numpy as np

    files = {
        "yolov5": {"epoch": 3, "best_fitness": np.float64(0.25), "model": model.half(), "ema": None, "updates": 7,
                   "optimizer": optimizer.state_dict(), "opt": {"weights": "x.pt", "imgsz": 64}, "date": "now"},
        "yolov8": {"model": YOLO("yolov8n.yaml").model.half(), "train_args": {"imgsz": 64}, "best_fitness": 0.1},
        "rtdetr": {"model": RTDETR("rtdetr-l.yaml").model, "epoch": -1},
    }
    for name, content in files.items():
        torch.save(content, tmp_path / f"{name}.pt")
        loaded = load(tmp_path / f"{name}.pt", map_location="cpu")
        original = content["model"].state_dict()
        for key, value in loaded["model"].state_dict().items():
            assert torch.equal(value, original[key]), (name, key)
    assert isinstance(loaded["model"], torch.nn.Module)


# ------------------------------------------------------------------------------------------
# Every path that loads a checkpoint
# ------------------------------------------------------------------------------------------

def _train_flags(data, tmp_path, name):
    return ["--data", str(data), "--img", "64", "--epochs", "1", "--batch-size", "4", "--workers", "0", "--device",
            "cpu", "--project", str(tmp_path), "--name", name, "--noplots"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_yolo_dataset(tmp_path_factory.mktemp("ckpt_data"), num_train=4, num_val=2, size=64)


@pytest.mark.parametrize("payload", [_ReduceToModel, _ReconstructorToModel])
def test_nanops_train_weights_refuses_with_exit_2(payload, data, marker, tmp_path, capsys):
    from nanops.cli import main

    evil = _save(payload(marker), tmp_path / "evil.pt")
    code = main(["train", "--weights", str(evil), "--cfg", str(transformer_yaml()),
                 *_train_flags(data, tmp_path, "evil")])
    err = capsys.readouterr().err
    assert code == 2 and not marker.exists()
    assert "refusing to load" in err and "DetectionModel" in err and "NANOPS_TRUST_CHECKPOINTS" in err


def test_nanops_train_resume_refuses_with_exit_2(data, marker, tmp_path, capsys):
    from nanops.cli import main

    last = tmp_path / "exp" / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    _save(_ReduceToModel(marker), last)  # no opt.yaml beside it: yolov5 reads the options from the file
    code = main(["train", "--resume", str(last)])
    assert code == 2 and not marker.exists()
    assert "refusing to load" in capsys.readouterr().err


def test_python_api_raises(data, marker, tmp_path):
    evil = _save(_ReconstructorToModel(marker), tmp_path / "evil.pt")
    with pytest.raises(UntrustedCheckpoint, match="copyreg._reconstructor"):
        nanops.yolov5.train(weights=str(evil), cfg=str(transformer_yaml()), data=str(data), imgsz=64, epochs=1,
                            batch_size=4, workers=0, device="cpu", project=str(tmp_path), name="api", noplots=True)
    assert not marker.exists()


def test_ultralytics_protect_refuses_pretrained_and_resumed_files(data, marker, tmp_path, monkeypatch):
    from ultralytics import YOLO

    import nanops.ultralytics

    monkeypatch.chdir(tmp_path)
    good = tmp_path / "last.pt"
    base = YOLO("yolov8n.yaml")
    optimizer = torch.optim.SGD(base.model.parameters(), lr=0.01)
    torch.save({"model": base.model, "train_args": {"data": str(data), "imgsz": 32}, "epoch": 0,
                "optimizer": optimizer.state_dict()}, good)
    evil = _save(_ReduceToModel(marker), tmp_path / "evil.pt")
    model = YOLO(str(good))  # the user's own load, before protect
    nanops.ultralytics.protect(model)
    flags = dict(data=str(data), epochs=1, imgsz=32, device="cpu", workers=0, plots=False, project=str(tmp_path))
    with pytest.raises(UntrustedCheckpoint, match="evil.pt"):
        model.train(pretrained=str(evil), **flags)
    _save(_ReduceToModel(marker), good)  # the resumed file replaced on disk after the model was made
    with pytest.raises(FileNotFoundError) as caught:  # ultralytics' check_resume rewords any load error
        model.train(resume=True, **flags)
    assert isinstance(caught.value.__cause__, UntrustedCheckpoint)
    assert not marker.exists()
    assert torch.load.__name__ == "load"  # torch's own again once the training call returned


def test_demo_results_reader_refuses(marker, tmp_path):
    from nanops.tools.demo import read_results

    (tmp_path / "weights").mkdir()
    (tmp_path / "results.csv").write_text("epoch,val/box_loss,val/obj_loss,val/cls_loss,metrics/mAP_0.5\n0,1,1,1,0\n")
    _save(_ReduceToModel(marker), tmp_path / "weights" / "last.pt")
    with pytest.raises(UntrustedCheckpoint):
        read_results("x", tmp_path)
    assert not marker.exists()


def test_inside_the_context_every_load_goes_through_the_policy(marker, tmp_path):
    evil = _save(_System(marker), tmp_path / "evil.pt")
    with checkpoint_loading():
        for kwargs in ({}, {"weights_only": False}, {"pickle_module": pickle}):
            with pytest.raises(UntrustedCheckpoint):
                torch.load(evil, **kwargs)
        with pytest.raises(pickle.UnpicklingError):  # an explicit weights_only=True: torch's own check
            torch.load(evil, weights_only=True)
    assert not marker.exists()
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buffer)
    buffer.seek(0)
    with checkpoint_loading():
        assert torch.equal(torch.load(buffer)["w"], torch.ones(2))
