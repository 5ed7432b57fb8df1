import os
from pathlib import Path

import pytest

from nanops.cli import main
from nanops.tools.doctor import DoctorError, check_hyp, check_labels, find_label_files, write_fixed_copies

BAD_FILE = [
    ("0 0.5 0.5 0.2 0.2", None),
    ("0 0.5 0.5 0.2 0.2", "duplicate of line 1"),
    ("1 1.5 0.5 0.2 0.2", "outside [0, 1]"),
    ("2 0.5 0.5 0 0.1", "zero or negative width/height"),
    ("3 0.5 0.5 0.1 -0.2", "zero or negative width/height"),
    ("foo 0.1 0.1 0.1 0.1", "non-numeric text"),
    ("-1 0.5 0.5 0.1 0.1", "negative class id"),
    ("3 0.5 0.5 0.1", "expected 5 columns"),
    ("0.5 0.5 0.5 0.1 0.1", "not an integer"),
    ("0 nan 0.5 0.1 0.1", "non-finite value"),
    ("7 0.5 0.5 0.1 0.1", "out of range (nc=5)"),
    ("", None),
    ("1 0.1 0.1 0.3 0.1 0.3 0.4 0.1 0.4", None),  # a valid segment row
    ("1 0.1 0.1 0.3 0.1 1.3 0.4 0.1 0.4", "outside [0, 1]"),  # segment point outside
]


def write_dataset(root: Path, clean_files: int = 3, bad: bool = True) -> Path:
    (root / "images" / "train").mkdir(parents=True)
    labels = root / "labels" / "train"
    labels.mkdir(parents=True)
    for i in range(clean_files):
        (labels / f"ok{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n4 0.1 0.9 0.05 0.1\n")
    if bad:
        (labels / "bad.txt").write_text("\n".join(line for line, _ in BAD_FILE) + "\n")
    data = root / "data.yaml"
    data.write_text("path: .\ntrain: images/train\nval: images/train\nnames: {0: a, 1: b, 2: c, 3: d, 4: e}\n")
    return data


def test_each_kind_of_bad_label_is_found_on_its_line(tmp_path):
    data = write_dataset(tmp_path)
    files, nc = find_label_files(data)
    assert nc == 5 and len(files) == 4  # train and val name the same folder: read once
    report = check_labels(files, nc)
    found = {(p.file.name, p.line): p.message for p in report.problems}
    for line_no, (_, expected) in enumerate(BAD_FILE, start=1):
        if expected is None:
            assert ("bad.txt", line_no) not in found, found.get(("bad.txt", line_no))
        else:
            assert expected in found[("bad.txt", line_no)]
    assert all(name == "bad.txt" for name, _ in found)


def test_clean_data_passes_with_exit_status_0(tmp_path, capsys):
    data = write_dataset(tmp_path, bad=False)
    assert main(["doctor", str(data)]) == 0
    assert "0 problem(s)" in capsys.readouterr().out


def test_bad_data_exit_status_1_and_file_line_report(tmp_path, capsys):
    data = write_dataset(tmp_path)
    assert main(["doctor", str(data)]) == 1
    out = capsys.readouterr().out
    assert f"{(tmp_path / 'labels' / 'train' / 'bad.txt').resolve()}:3: coordinates outside [0, 1]" in out


def test_fix_to_writes_clean_copies_and_leaves_originals(tmp_path):
    data = write_dataset(tmp_path)
    original = (tmp_path / "labels" / "train" / "bad.txt").read_text()
    files, nc = find_label_files(data)
    report = check_labels(files, nc)
    out = tmp_path / "fixed"
    write_fixed_copies(files, report, out)
    assert (tmp_path / "labels" / "train" / "bad.txt").read_text() == original
    fixed_files, _ = find_label_files(out)
    assert len(fixed_files) == 4
    assert check_labels(fixed_files, nc).problems == []
    assert (out / "bad.txt").read_text().split("\n")[0] == "0 0.5 0.5 0.2 0.2"


def test_missing_or_unreadable_inputs_give_clear_errors(tmp_path, capsys):
    with pytest.raises(DoctorError, match="no such file"):
        find_label_files(tmp_path / "missing.yaml")
    (tmp_path / "data.yaml").write_text("path: .\ntrain: images/train\n")
    with pytest.raises(DoctorError, match="not found"):
        find_label_files(tmp_path / "data.yaml")
    assert main(["doctor", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    report = check_labels(sorted(labels.glob("*.txt")))
    assert report.problems[0].line == 0 and "cannot read" in report.problems[0].message
    if os.geteuid() != 0:  # root reads anything
        locked = labels / "locked.txt"
        locked.write_text("0 0.5 0.5 0.1 0.1\n")
        locked.chmod(0)
        assert "cannot read" in check_labels([locked]).problems[0].message


def test_image_list_txt_maps_images_to_labels(tmp_path):
    write_dataset(tmp_path)
    (tmp_path / "train.txt").write_text("./images/train/bad.jpg\n./images/train/ok0.jpg\n./images/train/nolabel.jpg\n")
    (tmp_path / "list.yaml").write_text("path: .\ntrain: train.txt\nnc: 5\n")
    files, nc = find_label_files(tmp_path / "list.yaml")
    assert sorted(f.name for f in files) == ["bad.txt", "ok0.txt"]  # a missing label = background image


def test_large_synthetic_set_counts_every_problem(tmp_path):
    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(3000):
        bad = i % 100 == 0
        (labels / f"{i:05d}.txt").write_text("0 0.5 0.5 0.2 0.2\n" + ("1 0.5 0.5 0.0 0.2\n" if bad else "1 0.3 0.3 0.1 0.1\n"))
    report = check_labels(sorted(labels.glob("*.txt")), nc=2)
    assert report.rows == 6000
    assert len(report.problems) == 30 and all(p.line == 2 for p in report.problems)


def test_hyp_warnings():
    sgd_hyp = {"lr0": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "warmup_bias_lr": 0.1}
    assert check_hyp(sgd_hyp, "SGD") == []
    adam = check_hyp(sgd_hyp, "Adam")
    assert len(adam) == 1 and "lr0=0.01 with Adam" in adam[0]
    warmup = check_hyp({"lr0": 0.001, "momentum": 0.9, "warmup_bias_lr": 0.1}, "Adam")
    assert len(warmup) == 1 and "warmup_bias_lr=0.1" in warmup[0]
    assert check_hyp({"lr0": 0.001, "momentum": 0.9, "warmup_bias_lr": 0.001}, "AdamW") == []
    assert check_hyp({"lr0": 0.01, "momentum": 1.2}, "SGD")[0].startswith("momentum=1.2")
    with pytest.raises(DoctorError, match="lr0"):
        check_hyp({"momentum": 0.9})


def test_hyp_command_with_yolov5_default_and_adam(tmp_path, capsys):
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text("lr0: 0.01\nmomentum: 0.937\nweight_decay: 0.0005\nwarmup_bias_lr: 0.1\n")
    assert main(["doctor", "--hyp", str(hyp)]) == 0
    assert main(["doctor", "--hyp", str(hyp), "--optimizer", "Adam"]) == 1
    assert "use lr0=0.001" in capsys.readouterr().out


def test_fix_to_inside_the_labels_is_refused_before_anything_is_written(tmp_path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 0.2 0.2\n")
    sub = labels / "sub"
    sub.mkdir()
    (sub / "a.txt").write_text("1 0.1 0.1 0.1 0.1\n")  # an original that a copy of labels/a.txt would overwrite
    before = {p: p.read_bytes() for p in labels.rglob("*")if p.is_file()}
    assert main(["doctor", str(labels), "--fix-to", str(sub)]) == 2
    assert "overlaps the label folder" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in labels.rglob("*") if p.is_file()} == before
    assert main(["doctor", str(sub), "--fix-to", str(labels)]) == 2  # the other way round too


def test_fifo_and_device_links_are_not_read(tmp_path, capsys):
    import os

    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "ok.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    os.mkfifo(labels / "pipe.txt")  # reading it would block forever
    (labels / "zero.txt").symlink_to("/dev/zero")  # reading it would never end
    report = check_labels(*find_label_files(labels))
    messages = sorted((p.file.name, p.message) for p in report.problems)
    assert [name for name, _ in messages] == ["pipe.txt", "zero.txt"]
    assert all("not a regular file" in m for _, m in messages)


def test_unreadable_files_are_counted_in_fix_to(tmp_path, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "ok.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (labels / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    assert main(["doctor", str(labels), "--fix-to", str(tmp_path / "fixed")]) == 1
    out = capsys.readouterr().out
    assert "cannot read the label file" in out and "1 unreadable file(s) not copied" in out
    assert (tmp_path / "fixed" / "ok.txt").exists() and not (tmp_path / "fixed" / "binary.txt").exists()


@pytest.mark.parametrize("hyp_text, code, message", [
    ("lr0: .nan\n", 1, "lr0=nan: not a finite number"),
    ("lr0: fast\n", 2, "lr0 must be a number"),
    ("lr0: 0.01\nmomentum: [1]\n", 2, "momentum must be a number"),
])
def test_hyp_non_finite_and_malformed_values(tmp_path, capsys, hyp_text, code, message):
    hyp = tmp_path / "hyp.yaml"
    hyp.write_text(hyp_text)
    assert main(["doctor", "--hyp", str(hyp)]) == code
    captured = capsys.readouterr()
    assert message in captured.out + captured.err
    if code == 2:
        assert captured.err.count("\n") == 1


@pytest.mark.parametrize("yaml_text", ["train: 5\n", "- a\n- b\n", "nc: three\ntrain: images\n"])
def test_malformed_data_yaml_exits_2_with_one_line(tmp_path, capsys, yaml_text):
    data = tmp_path / "data.yaml"
    data.write_text(yaml_text)
    assert main(["doctor", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nanops doctor:") and err.count("\n") == 1


def test_streamed_batches_keep_line_numbers_and_find_duplicates_across_them(tmp_path, monkeypatch):
    import nanops.tools.doctor as doctor

    monkeypatch.setattr(doctor, "ROWS_PER_BATCH", 7)  # many batches, rows of one file split across them
    labels = tmp_path / "labels"
    labels.mkdir()
    lines = [f"0 0.5 0.5 0.{i % 9 + 1} 0.2" for i in range(1, 30)]
    lines[3] = "0 0.5 0.5 0.9 0.2"        # duplicate of line 8 (0.9 from i=8)... placed before it
    lines[20] = "3 1.5 0.5 0.2 0.2"       # out of [0, 1] at line 21
    (labels / "a.txt").write_text("\n".join(lines) + "\n")
    streamed = doctor.check_labels(*doctor.find_label_files(labels))
    monkeypatch.setattr(doctor, "ROWS_PER_BATCH", 1 << 18)
    whole = doctor.check_labels(*doctor.find_label_files(labels))
    assert [str(p) for p in streamed.problems] == [str(p) for p in whole.problems]
    assert streamed.rows == whole.rows == 29
    assert any(p.line == 21 and "outside [0, 1]" in p.message for p in streamed.problems)
    assert sum("duplicate of line" in p.message for p in streamed.problems) >= 1


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """A yolov5s-transformer checkpoint as yolov5 saves it (float16), and one whose attention
    logits were scaled x22500 (q and k weights x150): within 8x of float16's 65504."""
    import torch

    models = pytest.importorskip("nanops.yolov5.models")
    from nanops.tools.synthetic import write_yolo_dataset

    root = tmp_path_factory.mktemp("headroom")
    data = write_yolo_dataset(root / "data", num_train=2, num_val=1, size=64)
    torch.manual_seed(0)
    healthy, hot = models.build_transformer_model(), models.build_transformer_model()
    with torch.no_grad():
        layer = hot.model[8].m.tr[0]
        layer.q.weight.mul_(150)
        layer.k.weight.mul_(150)
    for name, model in (("healthy.pt", healthy), ("hot.pt", hot)):
        torch.save({"epoch": 0, "model": model.half(), "ema": None}, root / name)
    return data, root / "healthy.pt", root / "hot.pt"


def test_doctor_weights_measures_each_modules_float16_headroom(model_files, capsys):
    data, healthy, hot = model_files
    args = ["doctor", str(data), "--img", "128", "--batch", "2", "--weights"]
    assert main(args + [str(healthy)]) == 0
    out = capsys.readouterr().out
    assert "0 within 8x of float16's 65504" in out and "tightest: " in out
    assert main(args + [str(hot)]) == 1
    out = capsys.readouterr().out
    assert f"{hot}: warning: model.8.m.tr.0.ma q·k at 1/" in out and "1 within 8x" in out


def test_doctor_weights_refuses_what_it_cannot_run(model_files, tmp_path, capsys):
    data, healthy, _ = model_files
    assert main(["doctor", "--hyp", str(data), "--weights", str(healthy)]) == 2  # no DATA
    assert "--weights needs DATA" in capsys.readouterr().err
    assert main(["doctor", str(data), "--weights", str(tmp_path / "none.pt")]) == 2
    assert "no such model file" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert main(["doctor", str(data), "--weights", str(tmp_path / "junk.pt")]) == 2
    assert "cannot load the model file" in capsys.readouterr().err
