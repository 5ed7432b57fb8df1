import math

import pytest

from nanops.cli import main
from nanops.tools.demo import run_demo

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true"),
    pytest.mark.filterwarnings("ignore:Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD detected")]


@pytest.mark.slow
def test_demo_nanops_tracks_the_clean_run_plain_yolov5_is_lost(tmp_path, capsys):
    # The demo's own configuration, shortened to 15 epochs (the README's run has 30).
    clean, plain, ours = run_demo(epochs=15, plot=tmp_path / "demo.png", workdir=tmp_path / "work")
    assert not plain.weights_finite and not any(math.isfinite(v) for v in plain.val_loss[1:])
    for log in (clean, ours):
        assert log.weights_finite and all(math.isfinite(v) for v in log.val_loss)
        assert log.map50[-1] > 3 * log.map50[0] and log.val_loss[-1] < log.val_loss[0]  # it learns
    # nanops within a stated tolerance of the clean run: final val loss within 5%, mAP@.5 within 0.05.
    assert abs(ours.val_loss[-1] - clean.val_loss[-1]) <= 0.05 * clean.val_loss[-1]
    assert abs(ours.map50[-1] - clean.map50[-1]) <= 0.05
    assert [(s.epoch, s.iteration, s.kind, s.first_nonfinite) for s in ours.skipped] == [
        (1, 5, "batch", "forward of model.0.conv")]
    assert (tmp_path / "demo.png").stat().st_size > 20_000
    out = capsys.readouterr().out
    assert "final weights finite: plain yolov5 False, nanops True" in out and "nanops vs clean" in out


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--batch", "0"], "--batch must be >= 1"),
    (["--img", "70"], "--img must be a multiple of 32"),
    (["--corrupt-step", "999"], "--corrupt-step must be in [0, 120)"),
    (["--plot", "/nonexistent-dir/x.png"], "--plot: cannot write into /nonexistent-dir"),
])
def test_demo_bad_arguments_get_one_line_and_exit_2(argv, message, capsys):
    assert main(["demo", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_check_command_reports_clean_and_injected(capsys):
    assert main(["check", "--img", "64", "--batch", "1", "--patch"]) == 0
    assert "all finite" in capsys.readouterr().out
    assert main(["check", "--img", "64", "--batch", "1", "--inject-nan"]) == 1
    out = capsys.readouterr().out
    assert "model.0.conv" in out and "forward" in out


@pytest.mark.parametrize("argv, message", [
    (["check", "--batch", "0"], "--batch must be >= 1"),
    (["check", "--img", "7"], "--img must be a multiple of 32"),
])
def test_check_bad_arguments_exit_2_and_never_report_all_finite(argv, message, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and "all finite" not in captured.out


def test_bench_only_unknown_name_fails(capsys):
    assert main(["bench", "--only", "nosuch"]) == 2
    assert "no benchmark named nosuch" in capsys.readouterr().err


def test_bench_writes_where_told_prints_one_table_and_leaves_tracked_results(tmp_path, capsys):
    from pathlib import Path

    tracked = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
    before = {p: p.stat().st_mtime_ns for p in tracked.rglob("*")}
    assert main(["bench", "--only", "doctor", "--out", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("*/doctor.json"))) == 1
    assert capsys.readouterr().out.count("label check, 5000 files") == 1
    assert {p: p.stat().st_mtime_ns for p in tracked.rglob("*")} == before
