import math

import pytest

from nanops.cli import main
from nanops.demo import run_demo


@pytest.mark.slow
def test_demo_plain_run_goes_nan_nanops_run_recovers(tmp_path, capsys):
    plain, ours = run_demo(steps=6, corrupt_step=2, batch=2, image_size=128, plot=tmp_path / "demo.png")
    assert all(math.isfinite(v) for v in plain.loss[:2])
    assert all(not math.isfinite(v) for v in plain.loss[3:])  # NaN weights never recover
    assert ours.skipped == [False, False, True, False, False, False]
    assert all(math.isfinite(v) for i, v in enumerate(ours.loss) if i != 2)
    assert ours.findings[2] == "model.0.conv (forward)"
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    assert "step(s) skipped" in capsys.readouterr().out


def test_demo_command_exits_zero_when_nanops_recovers(tmp_path):
    assert main(["demo", "--steps", "4", "--corrupt-step", "1", "--img", "96", "--no-plot"]) == 0


def test_check_command_reports_clean_and_injected(capsys):
    assert main(["check", "--img", "64", "--batch", "1", "--patch"]) == 0
    assert "all finite" in capsys.readouterr().out
    assert main(["check", "--img", "64", "--batch", "1", "--inject-nan"]) == 1
    out = capsys.readouterr().out
    assert "model.0.conv" in out and "forward" in out
