"""What the CUDA kernels compile to on sm_90, read without a GPU: registers, spills, blocks per
SM, load widths, whether a kernel's loads are all issued before the first loaded value is used,
and MUFU.EX2 per softmax element a row runs.

    python benchmarks/sass_report.py [--out DIR]   (default ./nanops-bench/sass; the committed
                                                   file is benchmarks/results/sass/sm_90.json)

Needs nvcc (CUDA 12.1+) and cuobjdump (the one inside triton's package will do). Compiles
csrc/cuda/*.cu for sm_90 exactly as the kernels are (no torch headers), prints a markdown table
and writes sm_90.json. The numbers in benchmarks/README.md come from here.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REGS_PER_SM = 65536
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32

# (file, demangled-name pattern, block threads, elements per lane, exclusive exp paths, label).
# Exclusive exp paths: the unmasked kernels hold two copies of the exp loop (one FFMA + EX2 with
# the scale folded, for a positive scale; FADD + EX2 otherwise), of which a row runs one.
KERNELS = [
    ("stable_softmax", r"softmax_forward_warp<__half, \(nanops::MaskKind\)1, 2>", 128, 16, 1,
     "softmax fwd fp16, bool mask, L=400 (yolov5 C3TR at 640 px): 2 packs of 8 per lane"),
    ("stable_softmax", r"softmax_forward_warp<float, \(nanops::MaskKind\)2, 4>", 128, 16, 1,
     "softmax fwd fp32, float mask, L=400: 4 packs of 4 per lane"),
    ("stable_softmax", r"softmax_forward_warp<__half, \(nanops::MaskKind\)0, 7>", 128, 56, 2,
     "softmax fwd fp16, no mask, L=1600 (1280 px): 7 packs of 8 per lane"),
    ("stable_softmax", r"softmax_forward_warp<float, \(nanops::MaskKind\)0, 13>", 128, 52, 2,
     "softmax fwd fp32, no mask, L=1600: 13 packs of 4 per lane"),
    ("stable_softmax", r"softmax_forward_warp<__nv_bfloat16, \(nanops::MaskKind\)3, 1>", 128, 8, 1,
     "softmax fwd bf16, bf16 mask, L=64 (8 lanes per row, 4 rows per warp)"),
    ("stable_softmax", r"softmax_forward_block<__half, \(nanops::MaskKind\)1>", 512, None, 1,
     "softmax fwd fp16, bool mask, L > 2048 (row cached in shared memory when it fits)"),
    ("stable_softmax", r"softmax_backward_warp<__half, 2>", 128, 16, 1, "softmax bwd fp16, L=400"),
    ("stable_softmax", r"softmax_backward_warp<__half, 7>", 128, 56, 1, "softmax bwd fp16, L=1600"),
    ("stable_softmax", r"softmax_backward_block<__half>", 512, None, 1, "softmax bwd fp16, L > 2048"),
    ("grad_norm", r"multi_tensor_kernel<1152, .*NormPartialOp<\(nanops::NormKind\)2>", 512, None, 1,
     "grad norm p=2 (+ last-block combine and clip coefficient)"),
    ("grad_norm", r"multi_tensor_kernel<1152, .*ScaleOp>", 512, None, 1, "clip scale"),
    ("nonfinite_counts", r"multi_tensor_kernel<256, .*CountNonfinite>", 512, None, 1,
     "nonfinite_counts (256-entry table: yolov5s's 182 grads)"),
    ("nonfinite_counts", r"multi_tensor_kernel<256, .*FlagNonfinite>", 512, None, 1, "all_finite / nonfinite_flag"),
]


def _tool(name: str) -> str:
    found = shutil.which(name) or (f"/usr/local/cuda/bin/{name}" if Path(f"/usr/local/cuda/bin/{name}").exists() else None)
    if found is None and name == "cuobjdump":
        try:
            import triton

            candidate = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
            found = str(candidate) if candidate.exists() else None
        except ImportError:
            pass
    if found is None:
        sys.exit(f"sass_report: {name} not found")
    return found


def _demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def compile_file(stem: str, work: Path) -> tuple[str, str]:
    """(ptxas resource report, SASS) of csrc/cuda/<stem>.cu for sm_90."""
    cubin = work / f"{stem}.cubin"
    res = subprocess.run([_tool("nvcc"), "-cubin", "-arch=sm_90", "-O3", "--expt-relaxed-constexpr", "-std=c++20",
                          f"-I{ROOT / 'csrc'}", f"-I{ROOT}", "--resource-usage", str(ROOT / "csrc" / "cuda" / f"{stem}.cu"),
                          "-o", str(cubin)], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"sass_report: nvcc failed on {stem}.cu:\n{res.stderr[-3000:]}")
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    return res.stdout + res.stderr, sass


def resources(report: str) -> dict[str, dict]:
    out = {}
    pattern = re.compile(r"Function properties for (\S+)\n\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads\n(?:ptxas info\s+: Used (\d+) registers[^\n]*?(?:, (\d+) bytes smem)?)?")
    matches = list(pattern.finditer(report))
    names = _demangle([m.group(1) for m in matches])
    for m, name in zip(matches, names):
        if m.group(5) is None:
            continue
        out[name] = {"mangled": m.group(1), "registers": int(m.group(5)), "stack": int(m.group(2)),
                     "spill_stores": int(m.group(3)), "spill_loads": int(m.group(4)),
                     "static_smem": int(m.group(6) or 0)}
    return out


def kernel_sass(sass: str, mangled: str) -> list[str]:
    """The instructions of one kernel (its own body, not the out-of-line helpers after it)."""
    start = sass.find(f"Function : {mangled}\n")
    if start < 0:
        return []
    end = sass.find("Function : ", start + 12)
    body = sass[start:end if end > 0 else len(sass)]
    return [m.group(1).strip() for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+([^;]*);", body)]


def _registers(text: str) -> set[int]:
    return {int(r) for r in re.findall(r"\bR(\d+)\b", text)}


def load_analysis(instructions: list[str]) -> dict:
    widths: dict[str, int] = {}
    first_use = None
    last_load = None
    pending: dict[int, int] = {}  # register -> index of the load that writes it
    for i, ins in enumerate(instructions):
        op = ins.split()[1] if ins.startswith("@") else ins.split()[0]
        operands = ins.split(None, 2 if ins.startswith("@") else 1)[-1]
        if op.startswith("LDG"):
            width = next((w for w in (".128", ".64") if w in op), "")
            widths[f"LDG{width or '.32-'}"] = widths.get(f"LDG{width or '.32-'}", 0) + 1
            if first_use is None:
                dest = operands.split(",")[0]
                base = int(re.search(r"R(\d+)", dest).group(1)) if re.search(r"R(\d+)", dest) else None
                count = 4 if width == ".128" else 2 if width == ".64" else 1
                if base is not None:
                    for r in range(base, base + count):
                        pending[r] = i
                last_load = i
            continue
        if first_use is None and pending:
            parts = operands.split(",")
            sources = parts if op.startswith(("ST", "RED", "ATOM")) else parts[1:]
            if _registers(",".join(sources)) & set(pending):
                first_use = i
    loads_before_use = None
    if last_load is not None and first_use is not None:
        # The straight-line prologue: every load issued before that point precedes the first use.
        prologue_loads = sum(1 for i, ins in enumerate(instructions[:first_use]) if "LDG" in ins)
        loads_before_use = prologue_loads
    return {"loads": widths, "loads_before_first_use": loads_before_use,
            "mufu_ex2": sum(1 for ins in instructions if "MUFU.EX2" in ins)}


def blocks_per_sm(registers: int, threads: int, smem: int) -> int:
    per_thread = ((registers + 7) // 8) * 8  # registers are allocated per warp in units of 256
    by_regs = REGS_PER_SM // (per_thread * threads)
    by_threads = MAX_THREADS_PER_SM // threads
    by_smem = (228 * 1024) // smem if smem else MAX_BLOCKS_PER_SM
    return min(by_regs, by_threads, by_smem, MAX_BLOCKS_PER_SM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="nanops-bench/sass",
                        help="folder for sm_90.json (default ./%(default)s; benchmarks/results/sass is the committed one)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        compiled = {stem: compile_file(stem, Path(tmp)) for stem in sorted({k[0] for k in KERNELS})}
        for stem, pattern, threads, elems, paths, label in KERNELS:
            report, sass = compiled[stem]
            table = resources(report)
            matches = [name for name in table if re.search(pattern, name)]
            if not matches:
                sys.exit(f"sass_report: no kernel matches {pattern!r} in {stem}.cu")
            info = table[matches[0]]
            analysis = load_analysis(kernel_sass(sass, info["mangled"]))
            row = {"kernel": label, "name": matches[0], **info, **analysis,
                   "blocks_per_sm": blocks_per_sm(info["registers"], threads, info["static_smem"]),
                   "threads": threads}
            if elems:
                row["ex2_per_element"] = analysis["mufu_ex2"] / elems / paths
            rows.append(row)
    print("| kernel | regs | spills (st/ld B) | blocks/SM | loads | loads issued before first use | EX2/element |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        loads = ", ".join(f"{k} x{v}" for k, v in sorted(r["loads"].items()))
        ex2 = f"{r['ex2_per_element']:.2f}" if "ex2_per_element" in r else "-"
        before = r["loads_before_first_use"] if r["loads_before_first_use"] is not None else "-"
        print(f"| {r['kernel']} | {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['blocks_per_sm']} "
              f"({r['threads']} thr) | {loads} | {before} | {ex2} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    nvcc = subprocess.run([_tool("nvcc"), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    (out / "sm_90.json").write_text(json.dumps({"nvcc": nvcc, "arch": "sm_90", "kernels": rows}, indent=2))
    print(f"\nwritten: {out / 'sm_90.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
