"""Shared benchmark plumbing: device description, results JSON, the yolov5 grad list."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from timing import paired_ratio


def out_root() -> Path:
    """Where results go: NANOPS_BENCH_OUT (run.py's --out), else ./nanops-bench of the current
    folder; never into the installed package or over the committed results unless asked."""
    return Path(os.environ.get("NANOPS_BENCH_OUT", "nanops-bench"))


def bench_device() -> torch.device:
    forced = os.environ.get("NANOPS_BENCH_DEVICE")
    if forced:
        return torch.device(forced)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU x{torch.get_num_threads()} threads"


def device_slug(device: torch.device) -> str:
    name = device_name(device) if device.type == "cuda" else f"cpu-{torch.get_num_threads()}t"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def git_commit() -> str:
    if os.environ.get("NANOPS_COMMIT"):  # a copy of the tree without .git (a GPU machine's) says it
        return os.environ["NANOPS_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, check=True)
        # Results written by this very run do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":(top,exclude)benchmarks/results"],
                               capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(device: torch.device) -> dict:
    return {
        "date": datetime.date.today().isoformat(),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
    }


def write_results(name: str, device: torch.device, rows: list[dict], out_dir: Path | None = None) -> Path:
    folder = (out_dir or out_root()) / device_slug(device)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": environment(device), "rows": rows}, indent=2))
    return path


def print_table(title: str, rows: list[dict]) -> None:
    """One benchmark's rows, or the whole report's (rows that carry an "op" get an op column)."""
    with_op = any("op" in r for r in rows)
    with_host = any("nanops_host_us" in r for r in rows)
    header = (f"{'op':<12} " if with_op else "") + \
        f"{'case':<44} {'baseline':<34} {'base ms':>9} {'nanops ms':>10} {'ratio':>7} {'target':>7} {'GB/s':>7}" + \
        (f" {'host us base/nanops':>20}" if with_host else "")
    print(f"\n{title}\n{header}\n" + "-" * len(header))
    for r in rows:
        op = f"{r['op']:<12} " if with_op else ""
        gbps = f"{r['nanops_gbps']:.1f}" if r.get("nanops_gbps") else ""
        target = f">={r['target']:.2f}" if r.get("target") else ""
        host = f" {r['baseline_host_us']:>9.1f}/{r['nanops_host_us']:<10.1f}" if "nanops_host_us" in r else ""
        print(f"{op}{r['case'][:44]:<44} {r['baseline'][:34]:<34} {r['baseline_ms']:>9.3f} {r['nanops_ms']:>10.3f} "
              f"{r['speedup']:>6.2f}x {target:>7} {gbps:>7}{host}")


def report(name: str, title: str, device: torch.device, rows: list[dict]) -> list[dict]:
    """The end of every benchmark: its table, its JSON, and the rows for benchmarks/run.py."""
    print_table(title, rows)
    print(f"results: {write_results(name, device, rows)}")
    return rows


def row(case: str, baseline: str, base, ours, bytes_moved: int | None = None, **extra) -> dict:
    """One comparison: speedup = baseline time / nanops time (> 1 means nanops is faster): the
    median of the per-round ratios when both were timed in the same rounds (timing.compare),
    else the ratio of the medians."""
    paired = bool(base.samples) and len(base.samples) == len(ours.samples)
    out = {
        "case": case,
        "baseline": baseline,
        "baseline_ms": base.median_ms,
        "nanops_ms": ours.median_ms,
        "speedup": 1.0 / paired_ratio(ours, base) if paired else base.median_ms / ours.median_ms,
        "paired": paired,
        "baseline_timing": base.as_dict(),
        "nanops_timing": ours.as_dict(),
    }
    if bytes_moved:
        out["nanops_gbps"] = bytes_moved / (ours.median_ms * 1e-3) / 1e9
    out.update(extra)
    return out


def yolov5_transformer_grads(device: torch.device, dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """The real gradient list of yolov5s-transformer (yolov5 package) after one backward pass."""
    from nanops.yolov5 import build_transformer_model

    torch.manual_seed(0)
    model = build_transformer_model().to(device).train()
    out = model(torch.randn(2, 3, 256, 256, device=device))
    sum(o.float().square().mean() for o in out).backward()
    return [p.grad.detach().to(dtype) for p in model.parameters() if p.grad is not None]
