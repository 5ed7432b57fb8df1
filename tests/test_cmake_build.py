"""CMakeLists.txt builds a library that torch.ops.load_library loads, for C++/libtorch users."""
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_cpu_library_builds_and_runs_an_op(tmp_path):
    build = tmp_path / "build"
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
         f"-DPython3_EXECUTABLE={sys.executable}", "-DNANOPS_CUDA=OFF"],
        capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
    assert "CMake Warning" not in configure.stderr, configure.stderr[-3000:]
    compiled = subprocess.run(["cmake", "--build", str(build), "-j2"], capture_output=True, text=True)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    assert "warning:" not in compiled.stdout + compiled.stderr
    library = build / "libnanops.so"
    linked = subprocess.run(["ldd", str(library)], capture_output=True, text=True).stdout
    assert "libpython" not in linked  # loads into whichever Python (or libtorch program) opens it
    # A fresh process: the library registers the same operators as the Python package's _C.
    script = textwrap.dedent(f"""
        import math, torch
        torch.ops.load_library({str(library)!r})
        x = torch.tensor([[math.inf, 1.0, 2.0], [-math.inf, -math.inf, -math.inf]])
        y = torch.ops.nanops.stable_softmax(x, -1, 1.0, None)
        assert torch.equal(y, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])), y
        counts = torch.ops.nanops.nonfinite_counts([x])
        assert counts.tolist() == [[0, 1, 3]], counts
        print("CMAKE-LIBRARY-OK")
    """)
    ran = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert "CMAKE-LIBRARY-OK" in ran.stdout, ran.stdout[-3000:] + ran.stderr[-3000:]
