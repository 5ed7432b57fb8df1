"""A tiny YOLO-format dataset made on the spot (no downloads), for the demo and the tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def write_yolo_dataset(root: Path, num_train: int = 8, num_val: int = 4, size: int = 64, num_classes: int = 3,
                       seed: int = 0, box_size: tuple[float, float] = (0.2, 0.5), max_boxes: int = 3) -> Path:
    """Writes images/{train,val}/*.png, labels/{train,val}/*.txt (class cx cy w h, normalised)
    and data.yaml under `root`; returns the data yaml's path.

    Each image is dim noise with 1 to max_boxes flat-coloured boxes (sides a uniform fraction
    of the image in box_size) whose colour depends on the class, so a detector can learn them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    palette = np.array([[230, 40, 40], [40, 230, 40], [40, 40, 230], [230, 230, 40], [40, 230, 230]], dtype=np.uint8)
    for split, count in (("train", num_train), ("val", num_val)):
        images, labels = root / "images" / split, root / "labels" / split
        images.mkdir(parents=True, exist_ok=True)
        labels.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
            rows = []
            for _ in range(int(rng.integers(1, max_boxes + 1))):
                cls = int(rng.integers(0, num_classes))
                w, h = rng.uniform(*box_size, 2)
                cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
                x0, x1 = int((cx - w / 2) * size), int((cx + w / 2) * size)
                y0, y1 = int((cy - h / 2) * size), int((cy + h / 2) * size)
                pixels[y0:y1, x0:x1] = palette[cls % len(palette)]
                rows.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            Image.fromarray(pixels).save(images / f"img{i:04d}.png")
            (labels / f"img{i:04d}.txt").write_text("\n".join(rows) + "\n")
    names = "\n".join(f"  {c}: class{c}" for c in range(num_classes))
    data = root / "data.yaml"
    data.write_text(f"path: {root.resolve()}\ntrain: images/train\nval: images/val\nnc: {num_classes}\n"
                    f"names:\n{names}\n")
    return data
