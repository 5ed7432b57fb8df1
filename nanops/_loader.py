"""Chooses, once at import, what runs each nanops op: the compiled kernels, or their PyTorch
fallback (nanops/_fallback.py) where those cannot serve a tensor.

  * nanops._C imports: its CPU kernels, and its CUDA kernels when it has them and every visible
    GPU has an image in the build (sm_75 on a T4 needs a build for it); the fallback takes CUDA
    tensors otherwise, and every other device type (MPS, XPU, ...) always;
  * nanops._C does not import (no compiler at install, a torch upgraded since the build, ROCm),
    or NANOPS_FALLBACK=1: every op is defined here from nanops/ops.def and runs the fallback.

Each path is registered under the ops' own names, so callers never branch. One warning says
which path runs and why: at import when the whole library falls back, at first use on a device
otherwise; `nanops check` and `paths()` tell per device.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import _fallback
from ._torch_private import has_kernel

REBUILD = ("pip install --no-build-isolation --force-reinstall --no-deps nanops   "
           "(in a checkout: pip install --no-build-isolation -e .)")
FORCE_FALLBACK = "NANOPS_FALLBACK"  # =1: the fallback for every op (its tests run through it)

_C = None
_why_no_kernels: str | None = None
if os.environ.get(FORCE_FALLBACK) == "1":
    _why_no_kernels = f"{FORCE_FALLBACK}=1 is set"
else:
    try:
        from . import _C  # noqa: F811  (importing runs the TORCH_LIBRARY registrations)
    except (ImportError, OSError) as err:  # OSError: a library the build linked against is gone
        _why_no_kernels = f"nanops._C could not be loaded ({type(err).__name__}: {err})"


# Read before any fallback is registered under the CUDA key.
_CUDA_BUILT = _C is not None and has_kernel("nanops::nonfinite_counts", "CUDA")


def compiled() -> bool:
    """True when nanops' compiled kernels are loaded."""
    return _C is not None


def cuda_built() -> bool:
    """True when this build of nanops contains CUDA kernels."""
    return _CUDA_BUILT


def cuda_kernels_run_on(index: int) -> bool:
    """Whether the compiled CUDA kernels have an image for CUDA device `index` (its architecture's
    cubin or PTX it can compile). False in a CPU-only build, without nanops._C or such a device."""
    if not _CUDA_BUILT or not torch.cuda.is_available() or not 0 <= index < torch.cuda.device_count():
        return False
    return bool(_C.cuda_kernels_run_on(index))


def _gpu_gaps() -> list[str]:
    """The visible GPUs the compiled CUDA kernels cannot run on, described."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return []
    gaps = []
    for i in range(torch.cuda.device_count()):
        if not cuda_kernels_run_on(i):
            major, minor = torch.cuda.get_device_capability(i)
            gaps.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{major}{minor})")
    return gaps


_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _on_first_use(name: str, device_kind: str, why: str):
    impl = _fallback.IMPLEMENTATIONS[name]

    def run(*args):
        _warn_once(device_kind, f"nanops: {device_kind} tensors run nanops' PyTorch fallback ({why}): the same "
                                f"results, slower. For the kernels: {REBUILD}")
        return impl(*args)

    run.__name__ = f"{name}_fallback"
    return run


_LIBRARIES: list[torch.library.Library] = []  # kept alive: a Library's registrations die with it
_PATHS: dict[str, str] = {}  # device kind -> "kernels" or "fallback (why)"


def _register_everything() -> None:
    """No compiled library: the ops defined from ops.def, the fallback for every device."""
    define = torch.library.Library("nanops", "DEF")
    _LIBRARIES.append(define)
    for schema in _fallback.schemas().values():
        define.define(schema)
    for name, impl in _fallback.IMPLEMENTATIONS.items():
        define.impl(name, impl, "CompositeExplicitAutograd")
    for name, (backward, setup) in _fallback.AUTOGRAD.items():
        torch.library.register_autograd(f"nanops::{name}", backward, setup_context=setup, lib=define)
    _PATHS["every device"] = f"fallback ({_why_no_kernels})"
    warnings.warn(f"nanops: {_why_no_kernels}; every nanops op runs its PyTorch fallback: the same results, "
                  f"slower. For the kernels: {REBUILD}", RuntimeWarning, stacklevel=3)


def _register_gaps() -> None:
    """The compiled library is loaded: the fallback only where its kernels cannot serve."""
    lib = torch.library.Library("nanops", "IMPL")
    _LIBRARIES.append(lib)
    _PATHS["cpu"] = "kernels"
    gaps = _gpu_gaps() if _CUDA_BUILT else []
    if not _CUDA_BUILT:
        why = "this nanops build has no CUDA kernels (built where nvcc or a CUDA torch was missing)"
    elif gaps:
        why = f"this nanops build has no kernels for {', '.join(gaps)}"
    else:
        why = None
    if why is not None:
        for name in _fallback.IMPLEMENTATIONS:
            lib.impl(name, _on_first_use(name, "CUDA", why), "CUDA")
        _PATHS["cuda"] = f"fallback ({why})"
    else:
        _PATHS["cuda"] = "kernels"
    # Device types no nanops kernel is built for: the fallback, always. (Their own dispatch keys,
    # not CompositeExplicitAutograd: a sparse tensor must still be refused, not computed on.)
    for key in OTHER_DEVICES:
        for name in _fallback.IMPLEMENTATIONS:
            lib.impl(name, _on_first_use(name, key, "nanops builds kernels for CPUs and NVIDIA GPUs only"), key)
        _PATHS[key.lower()] = "fallback (no nanops kernels for it)"
    _register_sparse_refusals(lib)


OTHER_DEVICES = ("MPS", "XPU", "PrivateUse1")
SPARSE_KEYS = ("SparseCPU", "SparseCUDA", "SparseCsrCPU", "SparseCsrCUDA")


def _refuse_sparse(name: str):
    """The kernel of a sparse dispatch key: a ValueError naming the tensor (an argument problem,
    which the wrappers tell from a kernel's failure; clip_grad_norm_ then takes its sparse path)."""
    def refuse(*args, **kwargs):
        for arg in args:
            items = arg if isinstance(arg, (list, tuple)) else [arg]
            for i, t in enumerate(items):
                if isinstance(t, torch.Tensor) and t.layout != torch.strided:
                    where = f"tensors[{i}]" if isinstance(arg, (list, tuple)) else "a tensor argument"
                    raise ValueError(f"{name}: {where} has layout {t.layout}; only dense (strided) tensors are "
                                     "supported, call .to_dense() first")
        raise ValueError(f"{name}: only dense (strided) tensors are supported, call .to_dense() first")
    return refuse


def _register_sparse_refusals(lib) -> None:
    for key in SPARSE_KEYS:
        for name in _fallback.IMPLEMENTATIONS:
            lib.impl(name, _refuse_sparse(name), key)


if _C is None:
    _register_everything()
else:
    _register_gaps()


def paths() -> dict[str, str]:
    """Per device kind, what runs nanops' ops: "kernels", or "fallback (why)"."""
    return dict(_PATHS)


def describe() -> list[str]:
    """What serves nanops' ops here, one line each: the build, every visible GPU (its compute
    capability and whether this build has kernels for it), and the path per device kind."""
    if _C is None:
        lines = [f"nanops kernels: not loaded ({_why_no_kernels}); every op runs its PyTorch fallback"]
    else:
        lines = [f"nanops kernels: compiled, CPU{' and CUDA' if _CUDA_BUILT else ' only (no CUDA kernels built)'}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            has = "yes" if cuda_kernels_run_on(i) else "no (the fallback runs there)"
            lines.append(f"cuda:{i} {torch.cuda.get_device_name(i)}, compute capability {major}.{minor}: "
                         f"kernels in this build: {has}")
    else:
        lines.append("no CUDA device visible")
    ops = ", ".join(_fallback.IMPLEMENTATIONS)
    lines += [f"{kind}: {path}" for kind, path in _PATHS.items()]
    lines.append(f"(every op follows its device's path: {ops})")
    return lines
