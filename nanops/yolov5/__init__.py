"""nanops for the `yolov5` package: stable attention in its models, and its own training, protected.

`patch(model)` / `unpatch(model)` switch the nn.MultiheadAttention inside yolov5's
TransformerLayer (C3TR, TransformerBlock) to nanops' stable attention and back; the layers,
their Parameters and their state_dict keys stay yolov5's, and checkpoints of a patched model
load with yolov5 alone. `train(**kwargs)` runs yolov5's own train.py protected.

The wing, by job: protection.py (yolov5's events into nanops.training.Session), swaps.py (the
names train.py looks up), saving.py (finite checkpoints only), api.py (train, run_plain),
cli.py (`nanops train`), shims.py (yolov5's environment), models.py, hyp.py.
Nothing here imports the yolov5 package until a function needs it.
"""
from __future__ import annotations

from torch import nn

from .. import patching
from ..training import SKIPPED_CSV, SkippedStep
from .api import run, run_plain
from .models import base_model_type, build_transformer_model, transformer_yaml

__all__ = ["SKIPPED_CSV", "SkippedStep", "base_model_type", "build_transformer_model", "patch", "run", "run_plain",
           "train", "transformer_yaml", "unpatch"]


def patch(model: nn.Module) -> int:
    """Switches, in place, the attention of every yolov5 TransformerLayer in `model` (a yolov5
    `Model`, DetectMultiBackend's `.model`, or any nn.Module tree) to nanops' stable attention.

    The same Parameter objects stay in place, so an optimizer, EMA or DDP built earlier keeps
    training them. Returns how many attention modules were switched (0 when already patched)."""
    return patching.patch(model)


def unpatch(model: nn.Module) -> int:
    """Reverses `patch` (plain yolov5/torch modules again, e.g. before a TorchScript export)."""
    return patching.unpatch(model)


def train(**kwargs) -> object:
    """yolov5.train.run(**kwargs) protected by nanops (`nanops train` from Python); returns
    yolov5's opt namespace with `nanops_skipped`, `nanops_unsaved`, `nanops_promoted` and
    `nanops_divergences` added (see nanops.yolov5.api.run)."""
    return run(**kwargs)
