"""`nanops doctor DATA --weights FILE`: each module's float16 headroom in a model file, from one
training-mode forward on a batch of the data's own images under float16 autocast.

The checkpoint is loaded under nanops' checkpoint policy (no code from the file runs); a yolov5
or ultralytics checkpoint's EMA (else its model) is measured, in float32 weights, on a copy in
training mode (BatchNorm on batch statistics, as training runs it). The figures are what
`nanops train` watches during training (nanops.training.HeadroomMonitor), taken once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from ..training import Headroom, HeadroomMonitor, checkpoints
from .doctor import DoctorError

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


def image_files(data: Path, limit: int) -> list[Path]:
    """Up to `limit` training images of a yolov5 data yaml (its train entries: folders or .txt
    lists), or of a folder of images."""
    if data.is_dir():
        return sorted(p for p in data.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    try:
        cfg = yaml.safe_load(data.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DoctorError(f"{data}: cannot read the data yaml: {err}") from err
    root = Path(cfg.get("path") or ".") if isinstance(cfg, dict) else Path(".")
    root = root if root.is_absolute() else data.parent / root
    entries = cfg.get("train") if isinstance(cfg, dict) else None
    found: list[Path] = []
    for entry in [entries] if isinstance(entries, str) else entries or []:
        source = Path(entry) if Path(entry).is_absolute() else root / entry
        if source.is_dir():
            found += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.is_file() and source.suffix == ".txt":
            lines = [line.strip() for line in source.read_text().splitlines() if line.strip()]
            found += [Path(p) if Path(p).is_absolute() else source.parent / p for p in lines]
        if len(found) >= limit:
            break
    if not found:
        raise DoctorError(f"{data}: no training images found to run the model on")
    return found[:limit]


def image_batch(files: list[Path], size: int) -> torch.Tensor:
    """(N, 3, size, size) float32 in [0, 1], each image resized to a square as yolov5's loader
    feeds a training batch (letterboxing aside)."""
    from PIL import Image

    arrays = []
    for path in files:
        try:
            with Image.open(path) as image:
                arrays.append(np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0)
        except OSError as err:
            raise DoctorError(f"{path}: cannot read the image: {err}") from err
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_model(path: Path) -> torch.nn.Module:
    """The model in a checkpoint file (a yolov5/ultralytics dict: its EMA, else its model; or a
    pickled module), in float32, loaded without running code from the file."""
    if not path.is_file():
        raise DoctorError(f"{path}: no such model file")
    try:
        ckpt = checkpoints.load(path, map_location="cpu")
    except checkpoints.UntrustedCheckpoint as err:
        raise DoctorError(str(err)) from None
    except Exception as err:  # a truncated or foreign file: said in one line, exit 2
        raise DoctorError(f"{path}: cannot load the model file: {err}") from err
    model = ckpt
    if isinstance(ckpt, dict):
        model = ckpt.get("ema") if ckpt.get("ema") is not None else ckpt.get("model")
    if not isinstance(model, torch.nn.Module):
        raise DoctorError(f"{path}: holds no model (expected a yolov5/ultralytics checkpoint or a pickled module)")
    return model.float()


def model_headroom(model: torch.nn.Module, images: torch.Tensor,
                   device: torch.device | str = "cpu") -> tuple[list[Headroom], list[Headroom]]:
    """Every module output (and attention q·k/√d) that ran in float16 in one training-mode
    forward of `images` under float16 autocast on `device`, tightest first; and those of them
    within 8x of 65504 (HeadroomMonitor's warning factor)."""
    device = torch.device(device)
    model = model.to(device).train()
    monitor = HeadroomMonitor(model, every=1)
    monitor.begin()
    try:
        with torch.autocast(device.type, dtype=torch.float16):
            model(images.to(device))
    finally:
        monitor.stepped(skipped=False)
        monitor.remove()
    tight = monitor.read()
    return monitor.latest, tight
