"""nanops: kernels that keep Transformer-augmented YOLOv5 training out of NaN.

Ops (real ``torch.ops.nanops.*`` operators with CPU and CUDA kernels):
    nonfinite_counts, all_finite     fused NaN/Inf detection over tensor lists
    stable_softmax                   masked, scaled softmax that never returns NaN from overflow/masking
    clip_grad_norm_, get_total_norm, clip_grads_with_norm_
                                     fused, overflow-free grad-norm clipping (AMP unscale, distributed)
"""
from ._loader import cuda_built
from .clip import clip_grad_norm_, clip_grads_with_norm_, get_total_norm
from .ops import all_finite, nonfinite_counts, stable_softmax

__version__ = "0.1.0"

__all__ = [
    "all_finite",
    "clip_grad_norm_",
    "clip_grads_with_norm_",
    "cuda_built",
    "get_total_norm",
    "nonfinite_counts",
    "stable_softmax",
]
