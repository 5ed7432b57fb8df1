"""nanops: kernels that keep Transformer-augmented YOLOv5 training out of NaN.

Ops (real ``torch.ops.nanops.*`` operators with CPU and CUDA kernels):
    nonfinite_counts, all_finite     fused NaN/Inf detection over tensor lists
    stable_softmax                   masked, scaled softmax that never returns NaN from overflow/masking
    clip_grad_norm_, get_total_norm, clip_grads_with_norm_
                                     fused, overflow-free grad-norm clipping (AMP unscale, distributed)
Training: GradScaler (torch's, plus skipping non-finite steps with AMP off and restoring BatchNorm
statistics), guarded_step (yolov5's unscale/clip/step block in one call) and Guard (a loop's
protection: skips, BatchNorm restore, replay of a skipped step to name its first non-finite
module), watch, locate_step and locate_forward (first non-finite module). Models: patch/unpatch (stable attention in any model's
nn.MultiheadAttention), nanops.nn (MultiheadAttention, TransformerLayer, TransformerBlock, C3TR),
nanops.yolov5 (patch, and yolov5's own training protected: `nanops train`) and nanops.ultralytics
(protect), imported on first use: `import nanops` loads no framework code.
"""
import importlib

from . import nn
from ._loader import cuda_built
from .clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from .ops import all_finite, nonfinite_counts, stable_softmax
from .patching import patch, unpatch
from .training import (Diverged, Finding, GradScaler, Guard, RngState, StepResult, Watch, guarded_step,
                       locate_forward, locate_step, watch)

__version__ = "0.1.0"

_WINGS = ("yolov5", "ultralytics")


def __getattr__(name: str):
    """nanops.yolov5 / nanops.ultralytics on first use (PEP 562)."""
    if name in _WINGS:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Diverged",
    "Finding",
    "GradScaler",
    "Guard",
    "RngState",
    "StepResult",
    "Watch",
    "all_finite",
    "clip_grad_norm_",
    "clip_grads_with_norm_",
    "cuda_built",
    "get_total_norm",
    "guarded_step",
    "locate_forward",
    "nonfinite_counts",
    "locate_step",
    "patch",
    "stable_softmax",
    "unpatch",
    "watch",
]
