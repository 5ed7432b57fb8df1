"""Runs every benchmarks/bench_*.py on the current device and writes one report.

    python benchmarks/run.py [--only softmax,clip] [--out DIR]      (also: nanops bench)

Prints one table (op, case, baseline, times, ratio, GB/s) and writes report.json and report.png
under DIR/<device>/ (default ./nanops-bench; `--out benchmarks/results` updates the committed
reports), beside each benchmark's own JSON. With --only, the full report is left as it is (a
partial run must not replace it); the benchmarks' own JSON is written.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import bench_device, device_slug, environment, out_root, print_table  # noqa: E402


def discover(only: set[str] | None) -> list[str]:
    names = sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))
    return [n for n in names if only is None or n in only]


def save_chart(rows: list[dict], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = [f"{r['op']}: {r['case'][:40]} vs {r['baseline'][:28]}" for r in rows]
    ratios = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(rows) + 1.5))
    ax.barh(range(len(rows)), ratios, color=["tab:green" if v >= 1 else "tab:red" for v in ratios])
    ax.axvline(1.0, color="k", lw=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("speedup of nanops over the baseline (log scale; > 1 is faster)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated benchmark names (e.g. softmax,clip)")
    parser.add_argument("--out", help="results folder (default ./nanops-bench; benchmarks/results is the committed one)")
    args = parser.parse_args(argv)
    if args.out:
        os.environ["NANOPS_BENCH_OUT"] = args.out
    only = set(args.only.split(",")) if args.only else None
    known = discover(None)
    if only is not None and (unknown := sorted(only - set(known))):
        parser.error(f"--only: no benchmark named {', '.join(unknown)} (there are: {', '.join(known)})")
    device = bench_device()
    rows = []
    for name in discover(only):
        print(f"\n=== bench_{name} ===", flush=True)
        module = importlib.import_module(f"bench_{name}")
        rows += [{"op": name, **r} for r in module.main([])]
    env = environment(device)
    if only is None or len(only) > 1:  # one benchmark has printed its own table already
        print_table(f"nanops on {env['device']}", rows)
    if only is not None:
        return 0
    folder = out_root() / device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    chart = save_chart(rows, folder / "report.png", f"nanops on {env['device']} (torch {env['torch']}, {env['commit']})")
    print(f"\nreport: {folder / 'report.json'}" + (f", chart: {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
