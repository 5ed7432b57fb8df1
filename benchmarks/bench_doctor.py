"""nanops doctor's label check vs a per-line Python validator, on 5000 synthetic label files.

Budget (issue 5): thousands of files in seconds; printed as met / not met with the measured time.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from common import report, row
from nanops.tools.doctor import check_labels
from timing import measure

NUM_FILES = 5000
BUDGET_S = 5.0


def naive_check(files: list[Path]) -> int:
    """What a user script does: parse and test each line on its own."""
    bad = 0
    for f in files:
        for line in f.read_text().splitlines():
            parts = line.split()
            try:
                c, x, y, w, h = (float(v) for v in parts)
            except ValueError:
                bad += 1
                continue
            if c < 0 or c != int(c) or not all(0 <= v <= 1 for v in (x, y, w, h)) or w <= 0 or h <= 0:
                bad += 1
    return bad


def main(argv=None) -> list[dict]:
    device = torch.device("cpu")  # file checks run on the CPU whatever the accelerator
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i in range(NUM_FILES):
            path = Path(tmp) / f"{i:05d}.txt"
            boxes = "".join(f"{i % 80} 0.{(i + k) % 9 + 1} 0.5 0.1 0.2\n" for k in range(8))
            path.write_text(boxes + ("3 1.5 0.5 0.1 0.1\n" if i % 50 == 0 else ""))
            files.append(path)
        ours = measure(lambda fs: check_labels(fs, 80), [(files,)], device, min_runs=3, min_seconds=0.1)
        base = measure(naive_check, [(files,)], device, min_runs=3, min_seconds=0.1)
    rows = [row(f"label check, {NUM_FILES} files x 8-9 rows", "per-line Python validator", base, ours,
                files_per_s=NUM_FILES / (ours.median_ms / 1e3), budget_s=BUDGET_S,
                budget_met=ours.median_ms / 1e3 <= BUDGET_S)]
    report("doctor", "nanops doctor on cpu", device, rows)
    print(f"{NUM_FILES} files in {ours.median_ms / 1e3:.2f} s: budget of {BUDGET_S:.0f} s "
          f"{'met' if rows[0]['budget_met'] else 'NOT met'}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
