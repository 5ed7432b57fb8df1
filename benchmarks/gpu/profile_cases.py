"""The cases whose GPU targets were missed on the H100 (benchmarks/README.md), each run a few
times so that Nsight Compute can profile nanops' kernel and torch's beside it:

    ncu --clock-control none --kernel-name regex:'softmax|SoftMax|non_finite|nonfinite|all_finite' \
        --launch-skip 4 --launch-count 12 --section SpeedOfLight --section MemoryWorkloadAnalysis \
        --section Occupancy --section LaunchStats python benchmarks/gpu/profile_cases.py

(benchmarks/gpu/check.sh profile runs exactly that). Cases: stable_softmax forward and backward
vs torch.softmax at (16, 4, 400, 400) float16/float32 and (16, 4, 1600, 1600) float32; all_finite
vs torch's fused check on the yolov5s-transformer gradient list (182 tensors).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

import nanops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import yolov5_transformer_grads  # noqa: E402

REPEATS = 2  # the profiler skips the first launches (warm-up) and takes the next ones


def softmax_cases(device: torch.device) -> None:
    for shape, dtype in (((16, 4, 400, 400), torch.float16), ((16, 4, 400, 400), torch.float32),
                         ((16, 4, 1600, 1600), torch.float32)):
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(shape, device=device, dtype=dtype)
        for _ in range(REPEATS):
            torch.nvtx.range_push(f"nanops {shape} {dtype}")
            y = nanops.stable_softmax(x)
            y.backward(g)
            torch.nvtx.range_pop()
            torch.nvtx.range_push(f"torch {shape} {dtype}")
            y = torch.softmax(x, -1)
            y.backward(g)
            torch.nvtx.range_pop()
        del x, g, y
        torch.cuda.synchronize(device)


def nonfinite_cases(device: torch.device) -> None:
    grads = yolov5_transformer_grads(device)
    found_inf = torch.zeros(1, device=device)
    inv_scale = torch.ones(1, device=device)
    for _ in range(REPEATS):
        nanops.all_finite(grads)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, inv_scale)
    torch.cuda.synchronize(device)


def main() -> int:
    if not (torch.cuda.is_available() and nanops.cuda_built()):
        print("profile_cases: needs a GPU and a CUDA build of nanops", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    softmax_cases(device)
    nonfinite_cases(device)
    print("profile_cases: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
