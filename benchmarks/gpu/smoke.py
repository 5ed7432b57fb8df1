"""Every CUDA kernel instantiation of nanops run once against a reference, plus the no-sync and
CUDA-graph checks: the first thing to run on a GPU (benchmarks/gpu/check.sh runs it, alone and
under compute-sanitizer).

    python benchmarks/gpu/smoke.py [--device cuda|cpu] [--quick] [--json PATH]

Covered: stable_softmax forward for float32/float16/bfloat16 x {no mask, bool, float32 additive,
x-dtype additive} x every row-length class of the warp kernels (1 .. 2048: sub-warp groups, two
rows per group, vectorised or not, mask read as vectors or element by element), the warp/block
boundary (2048/2049), block kernels with the row cached in shared memory and without (rows
past shared memory), float64 (block kernels only), the block row loop past 2^20 rows, masks on a
non-last dim, transposed and misaligned masks, a dense misaligned x; backward for the same
classes; nonfinite_counts / all_finite / nonfinite_flag on lists past one launch table with size-0
tensors; the grad norm and clip for every p-norm kind, 16-bit and non-dense grads, inv_scale and
found_inf. --quick runs one case per kernel (for compute-sanitizer); --device cpu runs the same
cases on the CPU kernels at small sizes (so the script cannot rot without a GPU). Each check
compares with a float64 reference; the script exits 1 if any fails and prints one line per group.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback

import torch

import nanops

INF = float("inf")
TOL = {torch.float64: 1e-10, torch.float32: 2e-6, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def rel_error(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.double().cpu(), e.double().cpu()
    both_nan = a.isnan() & e.isnan()
    a, e = torch.where(both_nan, 0.0, a), torch.where(both_nan, 0.0, e)
    if a.isnan().any() or e.isnan().any():
        return math.inf
    denom = e.norm().item()
    return (a - e).norm().item() / (denom if denom > 0 else 1.0)


def reference_softmax(x, dim=-1, scale=1.0, mask=None):
    """float64, nanops' documented rules: fully masked rows 0, +inf logits share the mass."""
    z = scale * x.double().cpu()
    if mask is not None:
        m = mask.cpu()
        z = z.masked_fill(~m, -INF) if m.dtype == torch.bool else torch.where(m.double() == -INF, -INF, z + m.double())
    z = z.movedim(dim, -1)
    pos_inf = z == INF
    n_inf = pos_inf.sum(-1, keepdim=True)
    y = torch.softmax(z, -1)
    y = torch.where(n_inf > 0, pos_inf.double() / n_inf.clamp(min=1), y)
    y = torch.where((z == -INF).all(-1, keepdim=True), torch.zeros_like(y), y)
    return y.movedim(-1, dim)


class Checks:
    def __init__(self) -> None:
        self.results: list[dict] = []

    def check(self, group: str, case: str, ok: bool, detail: str = "") -> None:
        self.results.append({"group": group, "case": case, "ok": bool(ok), "detail": detail})
        if not ok:
            print(f"  FAIL {group}: {case} {detail}", flush=True)

    def run(self, group: str, case: str, fn) -> None:
        try:
            fn()
        except Exception as err:  # a crash is a failed case, not the end of the smoke run
            self.check(group, case, False, f"{type(err).__name__}: {err}")
            traceback.print_exc(limit=3)

    def summary(self) -> tuple[int, int]:
        groups: dict[str, list[bool]] = {}
        for r in self.results:
            groups.setdefault(r["group"], []).append(r["ok"])
        for g, oks in groups.items():
            print(f"{g:<34} {sum(oks):>4}/{len(oks):<4} {'ok' if all(oks) else 'FAILED'}")
        return sum(r["ok"] for r in self.results), len(self.results)


def aligned_or_not(shape, dtype, device, misaligned: bool) -> torch.Tensor:
    """A contiguous random tensor; misaligned: its data starts one element past a 16-byte boundary."""
    n = math.prod(shape)
    if misaligned:
        return torch.randn(n + 1, device=device).to(dtype)[1:].view(shape)
    return torch.randn(shape, device=device).to(dtype)


def softmax_cases(checks: Checks, device: str, quick: bool) -> None:
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    lengths = [1, 2, 4, 8, 16, 31, 32, 33, 64, 96, 128, 130, 256, 400, 401, 512, 1024, 1600, 2047, 2048, 2049, 5000]
    if quick:
        lengths = [7, 32, 64, 400, 2048, 2049, 5000]
    rows = 37  # not a multiple of any group size: the last block holds a partial group
    for dtype in dtypes:
        kinds = ["none", "bool", "float32", "x-dtype"] if dtype != torch.float32 else ["none", "bool", "float32"]
        for length in lengths:
            for kind in kinds:
                layouts = ["contiguous", "transposed", "row-broadcast", "misaligned-x"] if kind != "none" else [
                    "contiguous", "misaligned-x"]
                if quick:
                    layouts = layouts[:2]
                for layout in layouts:
                    case = f"{str(dtype)[6:]} L={length} mask={kind} {layout}"
                    checks.run("softmax fwd+bwd (warp/block)", case,
                               lambda d=dtype, L=length, k=kind, lay=layout, c=case: _softmax_case(
                                   checks, device, d, rows, L, k, lay, c))
    # float64: block kernels at every length.
    for length in ([3, 400, 3000] if not quick else [3]):
        checks.run("softmax float64 (block only)", f"L={length}",
                   lambda L=length: _softmax_case(checks, device, torch.float64, 5, L, "bool", "contiguous",
                                                  f"float64 L={L}", group="softmax float64 (block only)"))
    # Rows past shared memory: the uncached block kernels (60000 floats > 227 KB).
    for dtype in ([torch.float32, torch.float16] if not quick else [torch.float16]):
        checks.run("softmax uncached block rows", f"{dtype} L=60000",
                   lambda d=dtype: _softmax_case(checks, device, d, 3, 60000 if device == "cuda" else 3000, "float32",
                                                 "contiguous", f"{d} L=60000", group="softmax uncached block rows"))
    # Masks on a non-last dim: softmax over dim 1 of (B, L, H), mask (L, 1) broadcast.
    def non_last_dim():
        x = torch.randn(3, 50, 7, device=device)
        mask = torch.rand(50, 7, device=device) > 0.2
        y = nanops.stable_softmax(x, dim=1, scale=0.5, mask=mask)
        checks.check("softmax non-last dim", "dim=1 bool mask", rel_error(y, reference_softmax(x, 1, 0.5, mask)) < 1e-6)
    checks.run("softmax non-last dim", "dim=1", non_last_dim)
    if not quick and device == "cuda":
        checks.run("softmax block row loop", "2^20 + 3 rows", lambda: _many_rows(checks, device))


def _make_mask(kind: str, layout: str, shape, dtype, device):
    rows, length = shape
    if kind == "none":
        return None
    keep = torch.rand(rows, length, device=device) > 0.3
    keep[0] = False  # a fully masked row
    if kind == "bool":
        mask = keep
    else:
        add = torch.where(keep, torch.randn(rows, length, device=device), torch.full((rows, length), -INF, device=device))
        mask = add.to(torch.float32 if kind == "float32" else dtype)
    if layout == "transposed":
        mask = mask.t().contiguous().t()  # inner stride != 1
    elif layout == "row-broadcast":
        mask = mask[:, :1]  # broadcast along the softmax dim (inner stride 0)
    return mask


def _softmax_case(checks, device, dtype, rows, length, kind, layout, case, group="softmax fwd+bwd (warp/block)"):
    x = aligned_or_not((rows, length), dtype, device, misaligned=layout == "misaligned-x") * 3
    x[min(1, rows - 1), length // 2] = INF  # +inf shares the mass
    mask = _make_mask(kind, layout, (rows, length), dtype, device)
    if mask is not None and mask.dtype != torch.bool and rows > 2 and mask.shape[-1] == length:
        mask[2, length // 2] = -INF  # -inf masks even where nothing else is masked
    y = nanops.stable_softmax(x, scale=0.7, mask=mask)
    expected = reference_softmax(x, -1, 0.7, mask)
    err = rel_error(y, expected)
    checks.check(group, case + " fwd", err < TOL[dtype], f"rel error {err:.2e}")
    xg = x.detach().clone().requires_grad_()
    g = torch.randn_like(y)
    (grad,) = torch.autograd.grad(nanops.stable_softmax(xg, scale=0.7, mask=mask), xg, g)
    p = expected
    dot = (g.double().cpu() * p).sum(-1, keepdim=True)
    expected_grad = 0.7 * p * (g.double().cpu() - dot)
    err = rel_error(grad, expected_grad)
    checks.check(group, case + " bwd", err < 4 * TOL[dtype], f"rel error {err:.2e}")


def _many_rows(checks, device):
    rows, length = (1 << 20) + 3, 2049
    x = torch.randn(rows, length, device=device, dtype=torch.float16)
    y = nanops.stable_softmax(x)
    tail = slice(rows - 5, rows)
    err = rel_error(y[tail], reference_softmax(x[tail]))
    checks.check("softmax block row loop", f"{rows} rows x {length}", err < TOL[torch.float16], f"{err:.2e}")
    del x, y


def tensor_list_cases(checks: Checks, device: str, quick: bool) -> None:
    counts = [3, 64, 65, 1152, 1153, 1400] if not quick else [3, 1153]
    for n in counts:
        def run(n=n):
            tensors = [torch.empty(0, device=device) if i % 7 == 3 else torch.randn(i % 37 + 1, device=device)
                       for i in range(n)]
            nonempty = [i for i, t in enumerate(tensors) if t.numel()]
            tensors[nonempty[-1]][0] = float("nan")
            tensors[nonempty[len(nonempty) // 2]][0] = -INF
            out = nanops.nonfinite_counts(tensors).cpu()
            expected = torch.tensor([[t.isnan().sum().item(), t.isposinf().sum().item(), t.isneginf().sum().item()]
                                     for t in tensors])
            checks.check("nonfinite_counts / flags", f"{n} tensors counts", torch.equal(out, expected))
            checks.check("nonfinite_counts / flags", f"{n} tensors all_finite", not bool(nanops.all_finite(tensors)))
            checks.check("nonfinite_counts / flags", f"{n} tensors flag", nanops.ops.nonfinite_flag(tensors).item() == 1)
            clean = [t.nan_to_num(0.0, 0.0, 0.0) for t in tensors]
            checks.check("nonfinite_counts / flags", f"{n} clean", bool(nanops.all_finite(clean)))
        checks.run("nonfinite_counts / flags", f"{n} tensors", run)
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        def big(dtype=dtype):
            t = torch.randn(3 * 65536 + 5, device=device).to(dtype)
            t[65536] = INF
            t[-1] = float("nan")
            out = nanops.nonfinite_counts([t, t[::2]]).cpu()  # dense and strided
            checks.check("nonfinite_counts / flags", f"{dtype} chunk edges", out.tolist() == [[1, 1, 0], [0, 1, 0]]
                         or out.tolist() == [[1, 1, 0], [1, 1, 0]], str(out.tolist()))
        checks.run("nonfinite_counts / flags", f"{dtype}", big)


def clip_cases(checks: Checks, device: str, quick: bool) -> None:
    norm_types = [0.0, 1.0, 2.0, 3.0, INF] if not quick else [2.0, INF]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for p in norm_types:
            def run(dtype=dtype, p=p):
                shapes = [(100, 7), (0,), (70_000,), (3,)]
                grads = [torch.randn(s, device=device).to(dtype) * 5 for s in shapes]
                grads.append(torch.randn(40, 20, device=device).to(dtype)[:, ::2])  # non-dense
                params = []
                for g in grads:
                    q = torch.nn.Parameter(torch.empty(g.shape, device=device, dtype=dtype))
                    q.grad = g.clone()
                    params.append(q)
                flat = torch.cat([g.double().flatten().cpu() for g in grads]) * 0.5
                expected = (sum(bool((g != 0).any()) for g in grads) if p == 0
                            else torch.linalg.vector_norm(flat, p).item())
                found_inf = torch.zeros(1, device=device)
                total = nanops.clip_grad_norm_(params, 1.0, p, inv_scale=torch.tensor([0.5], device=device),
                                               found_inf=found_inf)
                ok = math.isclose(total.item(), expected, rel_tol=1e-5)
                checks.check("grad norm / clip", f"{dtype} p={p} norm", ok, f"{total.item()} vs {expected}")
                if p != 0:
                    after = torch.linalg.vector_norm(torch.cat([q.grad.double().flatten().cpu() for q in params]), p)
                    want = min(1.0, expected)
                    checks.check("grad norm / clip", f"{dtype} p={p} clipped", math.isclose(after.item(), want,
                                 rel_tol=TOL[dtype] * 10 + 1e-5), f"{after.item()} vs {want}")
                params[2].grad[123] = float("nan")
                before = [q.grad.clone() for q in params]
                nanops.clip_grad_norm_(params, 1.0, p, found_inf=found_inf)
                checks.check("grad norm / clip", f"{dtype} p={p} NaN untouched",
                             found_inf.item() == 1 and all(torch.equal(q.grad.nan_to_num(), b.nan_to_num())
                                                           for q, b in zip(params, before)))
            checks.run("grad norm / clip", f"{dtype} p={p}", run)

    def extremes():
        for values, dtype in (([1e20, 3e19], torch.float32), ([6e4, 6e4, 6e4], torch.float16),
                              ([1e-30, 2e-30], torch.float32), ([1e200, 1e200], torch.float64)):
            g = torch.tensor(values, device=device, dtype=dtype)
            total = nanops.get_total_norm([g])
            v = torch.tensor(values, dtype=torch.float64)
            expected = v.abs().max().item() * torch.linalg.vector_norm(v / v.abs().max()).item()  # no overflow
            checks.check("grad norm / clip", f"{dtype} magnitudes {values[0]:g}",
                         math.isfinite(total.item()) and math.isclose(total.item(), expected, rel_tol=1e-5),
                         f"{total.item()} vs {expected}")
    checks.run("grad norm / clip", "extremes", extremes)


def no_sync_and_graph_cases(checks: Checks, device: str, graph: bool = True) -> None:
    if device != "cuda":
        return
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.BatchNorm1d(32), torch.nn.Linear(32, 4)).cuda()
    params = list(model.parameters())
    x = torch.randn(16, 32, device="cuda")

    def backward():
        model(x).square().mean().backward()

    def sync_free():
        fused = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
        guard = nanops.Guard(model, fused)
        backward()
        guard.step()  # the first step of a fused optimizer syncs once (its state is created)
        scaler = nanops.GradScaler("cuda")
        plain_opt = torch.optim.SGD(model.parameters(), lr=0.01)
        backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            nanops.clip_grad_norm_(params, 1.0)
            nanops.nonfinite_counts([p.grad for p in params])
            nanops.all_finite([p.grad for p in params])
            guard.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checks.check("no host sync", "clip, counts, all_finite, Guard.step (fused SGD)", True)
        with torch.autocast("cuda"):
            loss = model(x).float().square().mean()
        scaler.scale(loss).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            scaler.unscale_(plain_opt)
            nanops.clip_grad_norm_(params, 1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        scaler.step(plain_opt)  # torch's own step reads found_inf once, as torch's GradScaler does
        scaler.update()
        checks.check("no host sync", "GradScaler unscale_ + clip", True)
    checks.run("no host sync", "set_sync_debug_mode('error')", sync_free)

    def capture_and_replay():
        grads = [torch.randn(1000, device="cuda") * 10, torch.randn(70_000, device="cuda")]
        inv_scale = torch.full((1,), 0.5, device="cuda")
        found_inf = torch.zeros(1, device="cuda")
        ps = []
        for g in grads:
            q = torch.nn.Parameter(torch.empty_like(g))
            q.grad = g.clone()
            ps.append(q)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            nanops.clip_grad_norm_(ps, 1.0, inv_scale=inv_scale, found_inf=found_inf)
        torch.cuda.current_stream().wait_stream(side)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            total = nanops.clip_grad_norm_(ps, 1.0, inv_scale=inv_scale, found_inf=found_inf)
        for trial in range(3):
            fresh = [torch.randn_like(q.grad) * (trial + 2) for q in ps]
            for q, f in zip(ps, fresh):
                q.grad.copy_(f)
            cuda_graph.replay()
            expected = torch.linalg.vector_norm(torch.cat([f.double().flatten() for f in fresh])).item() * 0.5
            checks.check("CUDA graph", f"clip replay {trial}", math.isclose(total.item(), expected, rel_tol=1e-5))
    if graph:
        checks.run("CUDA graph", "capture + replay of the fused clip", capture_and_replay)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="one case per kernel (for compute-sanitizer)")
    parser.add_argument("--json", help="write every case's result here")
    parser.add_argument("--no-graph", action="store_true",
                        help="leave out the CUDA-graph check (compute-sanitizer runs: graph capture needs the "
                             "caching allocator, which the sanitizers run without)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not (torch.cuda.is_available() and nanops.cuda_built()):
        print("smoke: no CUDA device or no CUDA kernels in this build", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    checks = Checks()
    t0 = time.perf_counter()
    softmax_cases(checks, args.device, args.quick)
    tensor_list_cases(checks, args.device, args.quick)
    clip_cases(checks, args.device, args.quick)
    no_sync_and_graph_cases(checks, args.device, graph=not args.no_graph)
    if args.device == "cuda":
        torch.cuda.synchronize()
    passed, total = checks.summary()
    print(f"smoke on {args.device}{' (quick)' if args.quick else ''}: {passed}/{total} cases passed in "
          f"{time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "quick": args.quick, "passed": passed, "total": total,
                       "cases": checks.results}, f, indent=1)
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main())
