import os

import pytest
import torch

from nanops.yolov5.shims import prepare_environment  # noqa: E402

# Offline yolov5/ultralytics with a writable config dir (and a font), before any test imports them.
prepare_environment()

HAS_CUDA = torch.cuda.is_available()

# CUDA cases are real parameters that show up as SKIPPED (with this reason) on machines without
# a GPU: a skip is never counted as a pass.
cuda_param = pytest.param(
    "cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none on this machine)")
)
DEVICES = ["cpu", cuda_param]
FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64."""
    a, e = actual.double(), expected.double()
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


_BLOCK_NANOPS = """
import importlib.abc, os, sys
class BlockNanops(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "nanops" or name.startswith("nanops."):
            raise ImportError("nanops is not installed here")
sys.meta_path.insert(0, BlockNanops())
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
os.environ["YOLO_OFFLINE"] = "1"
# yolov5 7.0.14 itself imports this private module on every train/val; newer huggingface_hub
# releases moved it (nanops.yolov5.env does the same for nanops' runs).
try:
    import huggingface_hub.utils._errors
except ModuleNotFoundError:
    import huggingface_hub.errors
    sys.modules["huggingface_hub.utils._errors"] = huggingface_hub.errors
import numpy
if not hasattr(numpy, "trapz"):
    numpy.trapz = numpy.trapezoid
"""


def run_without_nanops(code: str, cwd, timeout: int = 300) -> "subprocess.CompletedProcess":
    """Runs `code` in a fresh Python where importing nanops fails, as on a machine without it."""
    import subprocess
    import sys
    import textwrap

    return subprocess.run([sys.executable, "-c", _BLOCK_NANOPS + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)
