"""For demos (and tests): a non-finite value in one training batch, as a corrupt image gives."""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from ..training import forward_pre_hook


@contextlib.contextmanager
def inject_nonfinite_input(step: int, model_type: type | None = None, value: float = math.inf) -> Iterator[None]:
    """The `step`-th training forward (train mode, grad enabled, counted from 0) of any model of
    `model_type` (default: yolov5's BaseModel) gets one `value` pixel, written in place into its
    (N, C, H, W) input batch (or the batch dict's "img", as ultralytics passes it)."""
    if model_type is None:
        from ..yolov5 import base_model_type

        model_type = base_model_type()
    seen = 0

    def corrupt(module, args):
        nonlocal seen
        if isinstance(module, model_type) and module.training and torch.is_grad_enabled():
            images = args[0]["img"] if isinstance(args[0], dict) else args[0]
            if not torch.isfinite(images).all():
                return  # a replay of a batch already corrupted (nanops' locate): not a new forward
            if seen == step:
                images[0, 1, images.shape[2] // 2, images.shape[3] // 2] = value
            seen += 1

    handle = forward_pre_hook(corrupt)
    try:
        yield
    finally:
        handle.remove()
