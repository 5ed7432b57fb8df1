"""yolov5's checkpoints written only when finite as saved (yolov5 saves them in float16, where
1e5 is inf): otherwise the previous file is kept and the first offending tensor named."""
from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from ..ops import all_finite, nonfinite_counts


def first_nonfinite_tensor(ckpt: dict) -> str | None:
    """The first tensor of a yolov5 checkpoint's model or EMA (as it will be written) holding
    NaN/Inf, as "model.<key>", or None when all are finite. One fused check per module."""
    for part in ("model", "ema"):
        module = ckpt.get(part)
        if not isinstance(module, torch.nn.Module):
            continue
        items = [(k, t) for k, t in module.state_dict().items() if t.is_floating_point()]
        if not items or bool(all_finite([t for _, t in items])):
            continue
        counts = nonfinite_counts([t for _, t in items])
        first = int((counts.sum(1) > 0).nonzero()[0])
        return f"{part}.{items[first][0]}"
    return None


def guarded_save(save: Callable, refused: Callable[[str, str, dict], dict | None]) -> Callable:
    """`save` (torch.save) for yolov5's checkpoints (a dict holding 'model' and 'epoch'): one whose
    model or EMA is not finite is not written; `refused(path, tensor name, checkpoint)` is called
    and may return a checkpoint to write in its place (None: nothing is written). Anything else
    is saved as `save` saves it."""
    def guarded(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "model" in obj and "epoch" in obj:
            bad = first_nonfinite_tensor(obj)
            if bad is not None:
                instead = refused(str(f), bad, obj)
                return None if instead is None else save(instead, f, *args, **kwargs)
        return save(obj, f, *args, **kwargs)
    return guarded


def start_checkpoint(start: torch.nn.Module, refused: dict) -> dict:
    """A yolov5 checkpoint of the weights training started from (float16, as yolov5 saves), in
    the refused checkpoint's format: what a run leaves on disk when it never had a finite state
    to save. Loads with plain yolov5 (attempt_load, --weights); --resume starts at epoch 0."""
    return {"epoch": -1, "best_fitness": None, "model": start, "ema": None, "updates": None, "optimizer": None,
            "opt": refused.get("opt"), "git": refused.get("git"), "date": refused.get("date")}


def weights_on_disk(save_dir) -> str:
    """What a run's weights folder holds, said as it is."""
    weights = Path(save_dir) / "weights"
    kept = sorted(p.name for p in weights.glob("*.pt")) if weights.is_dir() else []
    if kept:
        return f"on disk: {', '.join(str(weights / name) for name in kept)}"
    return f"no checkpoint was written ({weights} is empty)"


def suspect_images(imgs: torch.Tensor, paths) -> list[str]:
    """The paths of the batch's images holding a NaN/Inf pixel, or every path of the batch when
    none does (the non-finite value arose inside the model or the loss)."""
    rows = (~torch.isfinite(imgs.detach()).flatten(1).all(1)).nonzero().flatten().tolist()
    return [str(paths[i]) for i in rows] if rows else [str(p) for p in paths]


class FiniteCheckpoints:
    """A run's refused checkpoint writes, and the weights it started from: a refused write keeps
    the previous file, and where there is none yet the start weights take its place (a run never
    ends with no weights when it ever had finite ones)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.unsaved: list[str] = []  # checkpoints not written because their state was not finite
        self.start: torch.nn.Module | None = None

    def keep_start(self, model: torch.nn.Module) -> None:
        """The weights training starts from (after any loading; once a run), float16 on the CPU
        as yolov5 saves them."""
        if self.start is None:
            self.start = copy.deepcopy(model).half().cpu()

    def refused(self, path: str, bad: str, checkpoint: dict) -> dict | None:
        """guarded_save's `refused`: said, counted, and the start weights returned where no file
        is there yet."""
        self.unsaved.append(path)
        instead = None
        if Path(path).exists():
            keep = "kept the previous file"
        elif self.start is not None:
            instead, keep = start_checkpoint(self.start, checkpoint), "wrote the start weights in its place"
        else:
            keep = "wrote nothing"
        self.logger.warning(f"nanops: not writing {path}: {bad} is not finite as saved; {keep}")
        return instead
