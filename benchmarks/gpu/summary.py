"""One screen from a benchmarks/gpu/check.sh run folder: each step's status and time, the CUDA
tests, the smoke cases, compute-sanitizer's error counts, the benchmark rows against their
targets, the seed-failure verdict, and a last line RESULT: PASS or FAIL.

    python benchmarks/gpu/summary.py WORK_FOLDER
"""
from __future__ import annotations

import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# The GPU targets (issue "On a GPU"): speedup = baseline time / nanops time unless noted.
TARGETS = [
    ("nonfinite", "256 MB", "_amp_foreach", 1.5),
    ("nonfinite", "yolov5s-transformer", "_amp_foreach", 1.2),
    ("nonfinite", "yolov5s-transformer", "loop", 10.0),
    ("clip", "yolov5s", "foreach=True", 1.5),
    ("clip", "1000 small", "foreach=True", 1.5),
    ("clip", "1e9 bf16 params +AMP unscale", "", 1.5),
    ("softmax", "fwd (", "torch.softmax(x)", 1.0),
    ("softmax", ("fwd (", "float16"), "x*scale + mask", 2.5),
    ("softmax", "fwd+bwd", "torch.softmax(x)", 1.0),
    ("transformer", "fp16 autocast", "yolov5", 1.0),
    ("transformer", "fp16 autocast", "SDPA", 1.0),
]


def steps(work: Path) -> list[tuple[str, str, str]]:
    path = work / "steps.tsv"
    return [tuple(line.split("\t")) for line in path.read_text().splitlines() if line] if path.exists() else []


def tests(work: Path) -> str | None:
    path = work / "tests.xml"
    if not path.exists():
        return None
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    a = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}.{c.get('name')}" for c in suite.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    text = f"{a['tests'] - a['failures'] - a['errors'] - a['skipped']} passed, {a['failures']} failed, " \
           f"{a['errors']} errors, {a['skipped']} skipped"
    return text + ("".join(f"\n    FAILED {name}" for name in failed[:8]))


def sanitizer(work: Path, tool: str) -> str:
    path = work / f"sanitizer-{tool}.log"
    if not path.exists():
        return "not run"
    text = path.read_text(errors="replace")
    if "skipped" in text[:200]:
        return "skipped (CPU mode)"
    m = re.search(r"(?:ERROR|RACECHECK) SUMMARY: (\d+) (?:error|hazard)", text)
    if not m:
        return "no ERROR SUMMARY (did it run? see its log)"
    ours, others = reports_by_owner(text)
    if ours + others == 0 or others == 0:
        return f"{m.group(1)} errors"
    # initcheck runs over every kernel (torch's writes must be tracked for it to know what was
    # written); what counts here is what it reports in nanops' kernels.
    return f"{ours} errors in nanops kernels ({others} in other kernels, {m.group(1)} in all)"


def reports_by_owner(text: str) -> tuple[int, int]:
    """compute-sanitizer's reports, counted by whether their device frames are nanops'."""
    blocks = re.split(r"\n(?========= (?:Uninitialized|Invalid|Race|Barrier|Error: Race|Warning))", text)
    ours = others = 0
    for block in blocks[1:]:
        if "nanops::" in block.split("Saved host backtrace")[0]:
            ours += 1
        else:
            others += 1
    return ours, others


def bench_rows(work: Path) -> list[dict]:
    rows = []
    for path in sorted(work.glob("bench/*/report.json")) or sorted(work.glob("bench/*/*.json")):
        data = json.loads(path.read_text())
        for r in data.get("rows", []):
            rows.append({"op": r.get("op", data.get("benchmark", "")), **r})
    return rows


def target_lines(rows: list[dict]) -> list[str]:
    out = []
    for op, case, base, target in TARGETS:
        parts = case if isinstance(case, tuple) else (case,)
        hits = [r for r in rows if r["op"] == op and all(c in r["case"] for c in parts) and base in r["baseline"]]
        for r in hits:
            out.append(f"  {'met ' if r['speedup'] >= target else 'MISS'} {r['speedup']:6.2f}x (>= {target}) "
                       f"{op}: {r['case'][:44]} vs {r['baseline'][:30]}")
    for r in rows:
        if r.get("read_ceiling_gbps") and r.get("nanops_gbps") and "loop" in r["baseline"]:
            share = r["nanops_gbps"] / r["read_ceiling_gbps"]
            out.append(f"  {'met ' if share >= 0.9 else 'MISS'} {share:6.1%} (>= 90%) of read bandwidth "
                       f"({r['nanops_gbps']:.0f} of {r['read_ceiling_gbps']:.0f} GB/s), {r['case'][:50]}")
        if "time_ratio" in r and "target_time_ratio" in r:
            out.append(f"  {'met ' if r['met'] else 'MISS'} {r['time_ratio']:6.3f} (<= {r['target_time_ratio']}) "
                       f"time ratio, {r['case'][:60]}")
    return out


def main(argv: list[str]) -> int:
    work = Path(argv[0])
    ok = True
    print("step                 status   seconds")
    for name, rc, seconds in steps(work):
        ok &= rc in ("0", "skipped")
        print(f"{name:<20} {rc:>6} {seconds:>9}")
    env = work / "environment.log"
    if env.exists():
        lines = env.read_text(errors="replace").splitlines()
        print("machine:", " | ".join(l for l in lines if l.startswith(("torch", "NVIDIA", "no GPU")))[:150])
    t = tests(work)
    if t:
        print("CUDA tests:", t)
        ok &= " 0 failed, 0 errors" in t
    smoke = work / "smoke.json"
    if smoke.exists():
        s = json.loads(smoke.read_text())
        print(f"smoke ({s['device']}{', quick' if s['quick'] else ''}): {s['passed']}/{s['total']} cases")
        for c in [c for c in s["cases"] if not c["ok"]][:6]:
            print(f"    FAILED {c['group']}: {c['case']} {c['detail']}")
        ok &= s["passed"] == s["total"]
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        verdict = sanitizer(work, tool)
        print(f"compute-sanitizer {tool:<10} {verdict}")
        ok &= verdict.startswith(("0 errors", "skipped", "not run"))
    rows = bench_rows(work)
    if rows:
        print(f"benchmarks: {len(rows)} rows; against the GPU targets:")
        for line in target_lines(rows)[:40]:
            print(line)
    seed = work / "seed" / "seed_training.json"
    if seed.exists():
        s = json.loads(seed.read_text())
        last = {r["run"]: r for r in s["results"]}
        for name, r in last.items():
            e = r["epochs"][-1]
            print(f"seed training {name:<6} x{r['attention_input_scale']:g}: final val loss {e['val_loss']:.4g}, "
                  f"mAP@.5 {e['map50']:.4f}, skipped {sum(x['skipped'] for x in r['epochs'])}, weights finite "
                  f"{r['weights_finite']}")
        print("seed verdict:", s["verdict"])
        ok &= s["verdict"]["nanops_finite"]
    print(f"RESULT: {'PASS' if ok else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
