"""yolov5's checkpoints written only when finite as saved (yolov5 saves them in float16, where
1e5 is inf): otherwise the previous file is kept and the first offending tensor named."""
from __future__ import annotations

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


def guarded_save(save: Callable, refused: Callable[[str, str], None]) -> Callable:
    """`save` (torch.save) for yolov5's checkpoints (a dict holding 'model' and 'epoch'): one whose
    model or EMA is not finite is not written, and `refused(path, tensor name)` is called;
    anything else is saved as `save` saves it."""
    def guarded(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "model" in obj and "epoch" in obj:
            bad = first_nonfinite_tensor(obj)
            if bad is not None:
                refused(str(f), bad)
                return None
        return save(obj, f, *args, **kwargs)
    return guarded


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
