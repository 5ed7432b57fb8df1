"""Where the compiled kernels cannot serve: the PyTorch fallback gives the kernels' answers, says
so once, and the default build holds kernels for every NVIDIA GPU from Turing on."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import nanops
from nanops import _fallback, _loader

ROOT = Path(__file__).resolve().parents[1]

_BLOCK_C = """
import importlib.abc, sys
class NoCompiledNanops(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "nanops._C":
            raise ImportError("undefined symbol: _ZN3c104impl (a torch upgraded since nanops was built)")
sys.meta_path.insert(0, NoCompiledNanops())
"""


def _run(code: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK_C + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env={**os.environ, **(env or {})})


def test_import_without_the_compiled_library_warns_and_gives_torchs_answers():
    result = _run("""
        import math, warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, nanops
        messages = [str(w.message) for w in caught if "nanops" in str(w.message)]
        assert len(messages) == 1 and "nanops._C could not be loaded" in messages[0], messages
        assert "undefined symbol" in messages[0] and "pip install" in messages[0]
        assert not nanops._loader.compiled() and nanops._loader.paths() == {
            "every device": nanops._loader.paths()["every device"]}

        torch.manual_seed(0)
        x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
        mask = torch.rand(3, 9) > 0.3
        mask[1] = False
        y = nanops.stable_softmax(x, scale=0.5, mask=mask)
        ref = torch.softmax((x * 0.5).masked_fill(~mask, -math.inf), -1).nan_to_num(0.0)
        torch.testing.assert_close(y, ref)
        assert torch.autograd.gradcheck(lambda t: nanops.stable_softmax(t, scale=0.5, mask=mask), (x,))

        grads = [torch.randn(5), torch.tensor([1.0, float("nan"), float("inf"), -float("inf")])]
        assert nanops.nonfinite_counts(grads).tolist() == [[0, 0, 0], [1, 1, 1]]
        assert not bool(nanops.all_finite(grads)) and bool(nanops.all_finite(grads[:1]))

        params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
        for i, p in enumerate(params):
            p.grad = torch.full((4,), 10.0 * (i + 1))
        twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for p, t in zip(params, twins):
            t.grad = p.grad.clone()
        norm = nanops.clip_grad_norm_(params, 1.0)
        ref_norm = torch.nn.utils.clip_grad_norm_(twins, 1.0)
        torch.testing.assert_close(norm, ref_norm)
        for p, t in zip(params, twins):
            torch.testing.assert_close(p.grad, t.grad)

        mha = nanops.nn.MultiheadAttention(8, 2).double()
        ref_mha = torch.nn.MultiheadAttention(8, 2).double()
        ref_mha.load_state_dict(mha.state_dict())
        q = torch.randn(5, 2, 8, dtype=torch.float64)
        torch.testing.assert_close(mha(q, q, q)[0], ref_mha(q, q, q)[0])

        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        guard = nanops.Guard(model, opt)
        before = [p.detach().clone() for p in model.parameters()]
        guard.begin()
        model(torch.full((3, 4), float("nan"))).sum().backward()
        assert guard.step().skipped
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        print("fallback ok")
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fallback ok" in result.stdout


def test_forced_fallback_runs_the_op_tests():
    """NANOPS_FALLBACK=1: the op test files again, every op through the fallback."""
    files = ["tests/test_stable_softmax.py", "tests/test_nonfinite_counts.py", "tests/test_clip_grad_norm.py",
             "tests/test_bad_inputs.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files],
                            capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env={**os.environ, "NANOPS_FALLBACK": "1"})
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


def test_fallback_matches_the_kernels_on_special_rows_and_overflowing_norms():
    torch.manual_seed(0)
    x = torch.randn(6, 33) * 4
    x[1, 5] = x[1, 9] = float("inf")
    x[2, 3] = float("nan")
    mask = torch.randn(6, 33)
    mask[3] = -float("inf")
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        xs = x.to(dtype)
        torch.testing.assert_close(_fallback.stable_softmax(xs, -1, 0.7, mask), nanops.stable_softmax(xs, scale=0.7,
                                                                                                      mask=mask),
                                   equal_nan=True, rtol=2e-2 if dtype == torch.bfloat16 else 2e-3, atol=1e-3)
    big = [torch.full((10,), 1e30, dtype=torch.float32), torch.full((3,), 3e38, dtype=torch.float32)]
    inv_scale = torch.tensor([0.5])
    for p in (1.0, 2.0, 3.0, float("inf"), 0.0):  # norms of 3e38-sized grads: float32 would overflow
        kernel = torch.ops.nanops.grad_norm_summary.default(big, p, inv_scale).reshape(1, -1)
        fallback = _fallback.grad_norm_summary(big, p, inv_scale).reshape(1, -1)
        for dtype in (torch.float32, torch.float64):
            expected = torch.ops.nanops.clip_coef_from_summaries.default(kernel, p, 1.0, inv_scale, None, dtype)
            got = _fallback.clip_coef_from_summaries(fallback, p, 1.0, inv_scale, None, dtype)
            for a, b in zip(got, expected):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_paths_and_check_name_what_runs():
    paths = _loader.paths()
    assert paths["cpu"] == "kernels" and "mps" in paths and paths["mps"].startswith("fallback")
    from nanops.cli import main

    assert main(["check", "--batch", "1", "--img", "64"]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine builds for its own GPU (torch's rule)")
@pytest.mark.skipif(not nanops.cuda_built(), reason="this build has no CUDA kernels")
def test_default_build_holds_turing_ampere_hopper_cubins_and_ptx():
    tools = [Path(torch.__file__).parents[1] / "triton" / "backends" / "nvidia" / "bin" / "cuobjdump",
             Path("/usr/local/cuda/bin/cuobjdump"), shutil.which("cuobjdump")]
    cuobjdump = next((str(t) for t in tools if t and Path(t).exists()), None)
    if cuobjdump is None:
        pytest.skip("no cuobjdump on this machine")
    library = next(Path(nanops.__file__).parent.glob("_C*.so"))
    elves = subprocess.run([cuobjdump, "--list-elf", str(library)], capture_output=True, text=True).stdout
    ptx = subprocess.run([cuobjdump, "--list-ptx", str(library)], capture_output=True, text=True).stdout
    for arch in ("sm_75", "sm_80", "sm_90"):  # "ELF file 1: _C.1.sm_75.cubin", one per kernel file
        assert f".{arch}.cubin" in elves, elves[:500]
    assert ".sm_90.ptx" in ptx and ".sm_75.ptx" not in ptx, ptx[:500]  # PTX of the newest only


def test_installs_without_a_compiler_and_runs_on_the_fallback(tmp_path):
    """No usable compiler: the build of nanops._C fails, the install does not (an optional
    extension), and the package imports on its fallback."""
    copy = tmp_path / "nanops-src"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("build", ".git", "*.so", "runs", "nanops-bench",
                                                             "gpu-check-out", ".whl", ".prebuilt"))
    env = {**os.environ, "CC": "false", "CXX": "false", "NANOPS_CUDA": "0", "NANOPS_FRESH_BUILD": "1"}
    build = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=copy, env=env,
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    assert not list((copy / "nanops").glob("_C*.so"))
    # -S: this checkout's editable install (a .pth finder) must not stand in for the copy.
    site_packages = str(Path(torch.__file__).parents[1])
    run = subprocess.run([sys.executable, "-S", "-W", "always", "-c",
                          "import torch, nanops; assert nanops.__file__.startswith(%r); "
                          "print(bool(nanops.all_finite([torch.ones(2)])))" % str(copy)],
                         cwd=copy, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": f"{copy}{os.pathsep}{site_packages}"})
    assert run.returncode == 0 and run.stdout.strip().endswith("True"), run.stderr[-2000:]
    assert "nanops._C could not be loaded" in run.stderr
