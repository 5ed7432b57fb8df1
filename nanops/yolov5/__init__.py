"""nanops for the `yolov5` package: stable attention in its models, and its own training, protected.

`patch(model)` / `unpatch(model)` switch the nn.MultiheadAttention inside yolov5's
TransformerLayer (C3TR, TransformerBlock) to nanops' stable attention and back; the layers,
their Parameters and their state_dict keys stay yolov5's, and checkpoints of a patched model
load with yolov5 alone. `train(**kwargs)` runs yolov5's own train.py protected (see
nanops.yolov5.train).
"""
from __future__ import annotations

from torch import nn

from .. import patching
from . import train  # the module `nanops train` lives in, callable as train(**kwargs) (see its end)
from .env import build_transformer_model, transformer_yaml

__all__ = ["build_transformer_model", "patch", "train", "transformer_yaml", "unpatch"]


def patch(model: nn.Module) -> int:
    """Switches, in place, the attention of every yolov5 TransformerLayer in `model` (a yolov5
    `Model`, DetectMultiBackend's `.model`, or any nn.Module tree) to nanops' stable attention.

    The same Parameter objects stay in place, so an optimizer, EMA or DDP built earlier keeps
    training them. Returns how many attention modules were switched (0 when already patched)."""
    return patching.patch(model)


def unpatch(model: nn.Module) -> int:
    """Reverses `patch` (plain yolov5/torch modules again, e.g. before a TorchScript export)."""
    return patching.unpatch(model)
