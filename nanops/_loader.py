"""Loads the compiled extension and tells what it was built with."""
import torch

from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)


def cuda_built() -> bool:
    """True when this build of nanops contains the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("nanops::nonfinite_counts", "CUDA")


def check_device(device: torch.device, what: str) -> None:
    """Raises a clear RuntimeError when a CUDA tensor reaches a build without CUDA kernels."""
    if device.type == "cuda" and not cuda_built():
        raise RuntimeError(
            f"{what}: got a CUDA tensor, but this nanops build has no CUDA kernels. Reinstall with a CUDA "
            "toolkit present (nvcc on PATH or CUDA_HOME set) or force it: NANOPS_CUDA=1 pip install "
            "--no-build-isolation -e ."
        )
