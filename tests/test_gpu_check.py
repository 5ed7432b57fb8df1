"""The prepared GPU check (benchmarks/gpu/check.sh) runs end to end in its CPU mode, so it cannot
rot before a GPU is lent: every step's plumbing, the smoke script over the CPU kernels, the host
benchmark, the seed-failure training at 64 px, the summary."""
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def test_gpu_check_runs_end_to_end_in_cpu_mode(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "check.sh"), "all", "--cpu"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    out = tmp_path / "out"
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RESULT: PASS" in summary
    for step in ("tests", "smoke", "bench", "seed"):
        assert any(line.startswith(step) and line.split()[1] == "0" for line in summary.splitlines()), summary
    # What a device call brings back: at most 8 files, nothing deeper than two folders.
    files = sorted(p.name for p in out.iterdir())
    assert files == ["bench-host.json", "logs.tgz", "seed_training.json", "summary.txt"], files
    seed = json.loads((out / "seed_training.json").read_text())
    assert seed["verdict"]["nanops_finite"] and {r["run"] for r in seed["results"]} == {"plain", "nanops"}
    with tarfile.open(out / "logs.tgz") as archive:
        names = archive.getnames()
    assert any(n.endswith("smoke.json") for n in names) and any(n.endswith("steps.tsv") for n in names)


def test_smoke_script_covers_every_kernel_class_on_the_cpu():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu" / "smoke.py"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    for group in ("softmax fwd+bwd (warp/block)", "softmax float64 (block only)", "softmax uncached block rows",
                  "nonfinite_counts / flags", "grad norm / clip"):
        assert group in done.stdout
