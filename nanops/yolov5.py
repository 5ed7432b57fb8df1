"""Patching a built yolov5 model with nanops' TransformerLayer."""
from __future__ import annotations

from torch import nn

from . import nn as nanops_nn
from ._yolov5_env import build_transformer_model, transformer_yaml

__all__ = ["build_transformer_model", "patch", "transformer_yaml"]

# Attributes yolov5's Model.forward reads on its top-level layers.
_ROUTING_ATTRS = ("f", "i", "type", "np")


def _is_yolov5_transformer_layer(module: nn.Module) -> bool:
    return (type(module).__name__ == "TransformerLayer" and not isinstance(module, nanops_nn.TransformerLayer)
            and all(hasattr(module, a) for a in ("q", "k", "v", "ma", "fc1", "fc2")))


def patch(model: nn.Module) -> int:
    """Replaces, in place, every yolov5 TransformerLayer in `model` by nanops' TransformerLayer.

    Works on a yolov5 `Model`, on DetectMultiBackend's `.model`, or on any nn.Module tree.
    Weights, device, dtype and train/eval mode are kept. Returns how many layers were replaced.
    """
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _is_yolov5_transformer_layer(child):
                continue
            new = nanops_nn.TransformerLayer(child.q.in_features, child.ma.num_heads)
            new.load_state_dict(child.state_dict(), strict=True)
            param = next(child.parameters())
            new.to(device=param.device, dtype=param.dtype)
            new.train(child.training)
            for attr in _ROUTING_ATTRS:
                if hasattr(child, attr):
                    setattr(new, attr, getattr(child, attr))
            parent._modules[name] = new
            replaced += 1
    return replaced
