"""The result tables of benchmarks/README.md, made from the committed result files.

    python benchmarks/readme_tables.py            # rewrites the tables between the README's markers
    python benchmarks/readme_tables.py --check    # exit 1 when a table differs from its files

Each results folder (benchmarks/results/<device>/report.json) has a block in the README between
`<!-- results: <device> -->` and `<!-- end results -->`: the device, torch, commit and date the
file records, then one row per comparison. tests/test_readme.py runs --check, so no figure in
those tables can disagree with the file it comes from.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE / "README.md"
RESULTS = HERE / "results"
_BLOCK = re.compile(r"(<!-- results: (?P<device>[\w.-]+) -->\n)(?P<body>.*?)(<!-- end results -->)", re.S)


def _date(report: Path, environment: dict) -> str:
    """The date the report records, or the day its file was committed (older reports)."""
    if environment.get("date"):
        return environment["date"]
    out = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(report)], capture_output=True, text=True,
                         cwd=HERE)
    return out.stdout.strip() or "unknown date"


def _ratio(row: dict) -> str:
    text = f"{row['speedup']:.2f}x"
    target = row.get("target")
    if target:
        text += f" (target ≥ {target:g}x: {'met' if row['speedup'] >= target else 'missed'})"
    if row.get("time_ratio") is not None and row.get("target_time_ratio") is not None:
        met = row["time_ratio"] <= row["target_time_ratio"]
        text = (f"time ratio {row['time_ratio']:.3f} (target ≤ {row['target_time_ratio']:.2f}: "
                f"{'met' if met else 'missed'})")
    return text


def table(device: str) -> str:
    report = RESULTS / device / "report.json"
    data = json.loads(report.read_text())
    env = data["environment"]
    lines = [f"`results/{device}/report.json`: {env['device']}, torch {env['torch']}, commit {env['commit']}, "
             f"{_date(report, env)}. Speedup = baseline time / nanops time (> 1: nanops faster).", "",
             "| op | case | baseline | baseline ms | nanops ms | speedup |", "|---|---|---|---|---|---|"]
    for row in data["rows"]:
        lines.append(f"| {row.get('op', '')} | {row['case']} | {row['baseline']} | {row['baseline_ms']:.3f} | "
                     f"{row['nanops_ms']:.3f} | {_ratio(row)} |")
    return "\n".join(lines) + "\n"


_SASS = re.compile(r"(<!-- sass: (?P<arch>\w+) -->\n)(?P<body>.*?)(<!-- end sass -->)", re.S)


def sass_table(arch: str) -> str:
    data = json.loads((RESULTS / "sass" / f"{arch}.json").read_text())
    lines = [f"`results/sass/{arch}.json` ({data['nvcc']}):", "",
             "| kernel | regs | spills (st/ld B) | blocks/SM | loads | loads before first use | EX2/element |",
             "|---|---|---|---|---|---|---|"]
    for r in data["kernels"]:
        loads = ", ".join(f"{k} x{v}" for k, v in sorted(r["loads"].items()))
        ex2 = f"{r['ex2_per_element']:.2f}" if "ex2_per_element" in r else "-"
        before = r["loads_before_first_use"] if r["loads_before_first_use"] is not None else "-"
        lines.append(f"| {r['kernel']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | "
                     f"{r['blocks_per_sm']} ({r['threads']} thr) | {loads} | {before} | {ex2} |")
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    text = _BLOCK.sub(lambda m: m.group(1) + table(m.group("device")) + m.group(4), text)
    return _SASS.sub(lambda m: m.group(1) + sass_table(m.group("arch")) + m.group(4), text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 on a difference")
    args = parser.parse_args(argv)
    text = README.read_text()
    rendered = render(text)
    if args.check:
        if rendered != text:
            print("benchmarks/README.md: a results table differs from its result files; run "
                  "python benchmarks/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
