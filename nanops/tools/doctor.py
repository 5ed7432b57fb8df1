"""`nanops doctor`: the NaN causes a kernel cannot fix, checked from files.

Labels: every YOLO label file of a yolov5 data yaml (or a labels folder) is parsed once and all
rows are checked together as one array: column count, non-numeric text, non-integer, negative
or out-of-range class ids, non-finite values, coordinates outside [0, 1] (unnormalised boxes),
zero or negative width/height, duplicate rows. Each problem is reported as `file:line: problem`.
Hyperparameters: lr0/optimizer combinations known to diverge (Adam/AdamW with SGD's lr0).
"""
from __future__ import annotations

import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..yolov5.hyp import HypError, hyp_warnings


class DoctorError(Exception):
    """The input itself could not be read (missing path, unreadable yaml): exit status 2."""


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int  # 1-based; 0 for the file as a whole
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


# --------------------------------------------------------------------------------------------
# Finding the label files
# --------------------------------------------------------------------------------------------

def _images_to_labels(path: Path) -> Path:
    """yolov5's rule: the last /images/ path component becomes /labels/, the suffix .txt."""
    parts = list(path.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    out = Path(*parts)
    return out if path.is_dir() else out.with_suffix(".txt")


def _split_label_files(root: Path, entry: str) -> list[Path]:
    source = Path(entry)
    source = source if source.is_absolute() else root / source
    if source.is_dir():
        labels = _images_to_labels(source)
        if not labels.is_dir():
            raise DoctorError(f"{source}: no labels folder at {labels} (yolov5 looks for /labels/ beside /images/)")
        return sorted(labels.rglob("*.txt"))
    if source.is_file() and source.suffix == ".txt":
        images = [line.strip() for line in source.read_text().splitlines() if line.strip()]
        files = [_images_to_labels(Path(p) if Path(p).is_absolute() else source.parent / p) for p in images]
        return [f for f in files if f.exists()]  # an image without a label file is a background image
    raise DoctorError(f"{source}: not found (expected a folder of images or a .txt list of images)")


def find_label_files(data: Path) -> tuple[list[Path], int | None]:
    """Label files named by a yolov5 data yaml (train/val/test) or under a labels folder, and nc."""
    if not data.exists():
        raise DoctorError(f"{data}: no such file or folder")
    if data.is_dir():
        return sorted(data.rglob("*.txt")), None
    if data.suffix not in (".yaml", ".yml"):
        raise DoctorError(f"{data}: expected a yolov5 data yaml or a folder of label files")
    try:
        cfg = yaml.safe_load(data.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DoctorError(f"{data}: cannot read the data yaml: {err}") from err
    if not isinstance(cfg, dict):
        raise DoctorError(f"{data}: not a yolov5 data yaml (expected a mapping)")
    try:
        return _label_files_of(data, cfg)
    except (TypeError, ValueError, AttributeError) as err:
        raise DoctorError(f"{data}: malformed data yaml: {err}") from err


def _label_files_of(data: Path, cfg: dict) -> tuple[list[Path], int | None]:
    root = Path(cfg.get("path") or ".")
    if not root.is_absolute():
        root = data.parent / root
    names = cfg.get("names")
    nc = cfg.get("nc", len(names) if names is not None else None)
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
        raise ValueError(f"nc must be a positive integer, got {nc!r}")
    files: dict[Path, None] = {}
    for split in ("train", "val", "test"):
        entries = cfg.get(split)
        if entries is not None and not isinstance(entries, (str, list)):
            raise ValueError(f"{split} must be a path or a list of paths, got {entries!r}")
        for entry in [entries] if isinstance(entries, str) else entries or []:
            for f in _split_label_files(root, entry):
                files[f.resolve()] = None
    if not files and not any(cfg.get(s) for s in ("train", "val", "test")):
        raise DoctorError(f"{data}: names no train/val/test images")
    return list(files), nc


# --------------------------------------------------------------------------------------------
# Checking the labels
# --------------------------------------------------------------------------------------------

@dataclass
class LabelReport:
    files: int
    rows: int
    problems: list[Problem]
    bad_rows: dict[Path, set[int]]  # lines to drop per file, for --fix-to


def _parse_rows(rows: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Float array of the 5-token rows (NaN where a row has a non-number) and a per-row numeric flag."""
    flat = [token for row in rows for token in row]
    try:
        # float() over one flat list is several times faster than numpy's string conversion.
        values = np.fromiter(map(float, flat), dtype=np.float64, count=len(flat)).reshape(len(rows), 5)
        return values, np.ones(len(rows), dtype=bool)
    except ValueError:
        pass  # some token is not a number: find which rows, the rest still get checked
    out = np.full((len(rows), 5), np.nan)
    numeric = np.ones(len(rows), dtype=bool)
    for i, row in enumerate(rows):
        try:
            out[i] = [float(t) for t in row]
        except ValueError:
            numeric[i] = False
    return out, numeric


# Rows parsed and checked together; files are streamed, so memory is bounded by this many rows'
# text plus 7 numbers per row (a 200 MB label file no longer needs gigabytes).
ROWS_PER_BATCH = 1 << 18


def _row_problems(rows: list[list[str]], values: np.ndarray, numeric: np.ndarray, nc: int | None):
    """(row mask, message) pairs for one batch: every check but duplicates."""
    cls, xywh = values[:, 0], values[:, 1:]
    checks = [
        (~numeric, lambda i: f"non-numeric text: {' '.join(rows[i])!r}"),
        (numeric & ~np.isfinite(values).all(1), lambda i: f"non-finite value: {' '.join(rows[i])}"),
        (numeric & np.isfinite(cls) & (cls < 0), lambda i: f"negative class id {rows[i][0]}"),
        (numeric & np.isfinite(cls) & (cls >= 0) & (cls != np.round(cls)),
         lambda i: f"class id {rows[i][0]} is not an integer"),
        (numeric & np.isfinite(xywh).all(1) & ((xywh < 0) | (xywh > 1)).any(1),
         lambda i: f"coordinates outside [0, 1] (unnormalised box?): {' '.join(rows[i][1:])}"),
        (numeric & np.isfinite(xywh[:, 2:]).all(1) & (xywh[:, 2:] <= 0).any(1),
         lambda i: f"zero or negative width/height: w={rows[i][3]} h={rows[i][4]}"),
    ]
    if nc is not None:
        checks.append((numeric & (cls == np.round(cls)) & (cls >= nc),
                       lambda i: f"class id {rows[i][0]} out of range (nc={nc})"))
    return checks


def _segment_as_box(tokens: list[str]) -> list[str] | None:
    """A segment row (class x1 y1 x2 y2 ...) as its bounding box row; None if not numeric."""
    try:
        values = np.array(tokens, dtype=np.float64)
    except ValueError:
        return None
    xy = values[1:].reshape(-1, 2)
    x0, y0 = xy.min(0)
    x1, y1 = xy.max(0)
    return [tokens[0], str((x0 + x1) / 2), str((y0 + y1) / 2), str(x1 - x0), str(y1 - y0)]


def check_labels(files: list[Path], nc: int | None = None) -> LabelReport:
    """Checks every row of every label file; see the module docstring for what is checked.

    Only regular files are read (a FIFO or a link to a device is reported, not read), line by
    line, in batches of ROWS_PER_BATCH rows."""
    problems: list[Problem] = []
    rows: list[list[str]] = []
    where: list[tuple[int, int]] = []  # (file index, line number) of each 5-column row of the batch
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (values, file index, line) per batch

    def flush() -> None:
        if not rows:
            return
        values, numeric = _parse_rows(rows)
        file_idx = np.fromiter((w[0] for w in where), dtype=np.int64, count=len(where))
        line_no = np.fromiter((w[1] for w in where), dtype=np.int64, count=len(where))
        for mask, message in _row_problems(rows, values, numeric, nc):
            for i in np.flatnonzero(mask):
                problems.append(Problem(files[file_idx[i]], int(line_no[i]), message(i)))
        parts.append((values, file_idx, line_no))
        rows.clear()
        where.clear()

    for fi, path in enumerate(files):
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                # a FIFO would block, a link to /dev/zero never ends: only regular files are read
                problems.append(Problem(path, 0, "not a regular file (FIFO, device or socket); not read"))
                continue
            with open(path, encoding="utf-8") as f:
                for ln, line in enumerate(f, start=1):
                    tokens = line.split()
                    if len(tokens) == 5:
                        rows.append(tokens)
                        where.append((fi, ln))
                    elif not tokens:
                        continue
                    elif len(tokens) >= 7 and len(tokens) % 2 == 1 and (box := _segment_as_box(tokens)):
                        rows.append(box)
                        where.append((fi, ln))
                    elif len(tokens) >= 7 and len(tokens) % 2 == 1:
                        problems.append(Problem(path, ln, f"non-numeric text in a segment row: {' '.join(tokens)!r}"))
                    else:
                        problems.append(Problem(path, ln, f"expected 5 columns (class x_center y_center width "
                                                          f"height), got {len(tokens)}"))
                    if len(rows) >= ROWS_PER_BATCH:
                        flush()
        except (OSError, UnicodeDecodeError) as err:
            problems.append(Problem(path, 0, f"cannot read the label file: {err}"))
    flush()
    total_rows = sum(len(v) for v, _, _ in parts)
    if parts:
        values = np.concatenate([v for v, _, _ in parts])
        file_idx = np.concatenate([f for _, f, _ in parts])
        line_no = np.concatenate([n for _, _, n in parts])
        # Exact duplicate rows within a file (yolov5 drops them with a warning).
        order = np.lexsort((line_no, *values.T[::-1], file_idx))
        sorted_values, sorted_files = values[order], file_idx[order]
        same = np.zeros(len(values), dtype=bool)
        same[1:] = (sorted_files[1:] == sorted_files[:-1]) & (sorted_values[1:] == sorted_values[:-1]).all(1)
        del sorted_values, sorted_files
        for k in np.flatnonzero(same):
            i, first = order[k], order[k - 1]
            problems.append(Problem(files[file_idx[i]], int(line_no[i]), f"duplicate of line {line_no[first]}"))
    problems.sort(key=lambda p: (str(p.file), p.line))
    bad_rows: dict[Path, set[int]] = {}
    for p in problems:
        bad_rows.setdefault(p.file, set()).add(p.line)
    return LabelReport(files=len(files), rows=total_rows, problems=problems, bad_rows=bad_rows)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_fix_target(files: list[Path], out_dir: Path) -> Path:
    """The labels' common folder; a DoctorError when out_dir lies inside it or contains it (a copy
    could then land on an original, or the next run would read the copies as labels)."""
    base = Path(os.path.commonpath([str(f.resolve().parent) for f in files]))
    target = out_dir.resolve()
    if _overlaps(target, base):
        raise DoctorError(f"--fix-to {out_dir} overlaps the label folder {base}; choose a folder outside it "
                          "(nothing was written)")
    return base


def write_fixed_copies(files: list[Path], report: LabelReport, out_dir: Path) -> tuple[int, int]:
    """Copies every label file under out_dir (same relative layout), bad rows dropped. Originals
    are never touched (an out_dir overlapping them is refused before anything is written).
    Returns (rows dropped, files not copied because they could not be read)."""
    if not files:
        return 0, 0
    base = check_fix_target(files, out_dir)
    dropped = not_copied = 0
    for f in files:
        target = out_dir / f.resolve().relative_to(base)
        bad = report.bad_rows.get(f)
        if bad and 0 in bad:  # unreadable or not a regular file: reported, and counted here
            not_copied += 1
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if not bad:
            shutil.copyfile(f, target)
            continue
        kept = [line for ln, line in enumerate(f.read_text().splitlines(), start=1) if ln not in bad]
        dropped += sum(1 for ln in bad if ln > 0)
        target.write_text("\n".join(kept) + ("\n" if kept else ""))
    return dropped, not_copied


# --------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------

def check_hyp(hyp: dict, optimizer: str = "SGD") -> list[str]:
    """Warnings for yolov5 hyperparameters known to drive training into NaN, each with its reason
    (the rules live with yolov5's wing, which `nanops train` runs at its start)."""
    try:
        return hyp_warnings(hyp, optimizer)
    except HypError as err:
        raise DoctorError(str(err)) from None


def load_hyp(path: Path) -> dict:
    try:
        hyp = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise DoctorError(f"{path}: cannot read the hyp file: not UTF-8 text ({err.reason} at byte {err.start})") from err
    except (OSError, yaml.YAMLError) as err:
        raise DoctorError(f"{path}: cannot read the hyp file: {err}") from err
    if not isinstance(hyp, dict):
        raise DoctorError(f"{path}: not a yolov5 hyp file (expected a mapping)")
    return hyp
