"""The failure nanops was started for, on a GPU: yolov5s-transformer trained with AMP by plain
`yolov5 train` and by `nanops train`, same seed, same synthetic data, per-epoch records.

    python benchmarks/gpu/seed_training.py --out DIR [--epochs 10] [--img 320] [--images 64]
                                           [--attention-input-scale auto|probe|S]

Both runs are yolov5's own train.py (nanops train swaps in its protection from outside). Per
epoch: train loss, val loss, mAP@.5, optimizer steps skipped, the GradScaler's scale at the
epoch's end; at the end, whether every weight and buffer of last.pt is finite.

With --attention-input-scale S the input of every C3TR's transformer layer is multiplied by S in
both runs (larger activations entering the attention, so that its q.k logits overflow float16 as
in the report that started nanops). "auto" first trains plain at S = 1 and, if that run stays
finite, looks for the smallest S (a power of 2 from 256) at which one float16-autocast forward of
the model is non-finite under plain yolov5 and finite with nanops' attention, and trains both at
that S; "probe" skips the S = 1 run. Writes DIR/seed_training.json and prints a table. --device
cpu runs the same plumbing on tiny images without AMP (the check's CPU mode).

The data and hyp are the demo's (one class of large flat boxes; lr0 0.1, no mosaic), so that a
few epochs reach a non-zero mAP; the model is the full-width yolov5s-transformer. AMP is forced
on: yolov5's check_amp would otherwise fetch yolov5n.pt, which an offline GPU machine cannot,
and disable AMP when that fails.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import sys
import time
from pathlib import Path

import torch

from nanops.tools.demo import demo_files
from nanops.yolov5.shims import prepare_environment, quiet_yolov5_import


@contextlib.contextmanager
def recorded_scaler_updates(log: list[dict]):
    """Every GradScaler.update() (torch's and nanops', which calls torch's): the scale after it
    and whether the step before it found inf; epochs counted at each LR scheduler step."""
    from torch.optim.lr_scheduler import LRScheduler

    epoch = {"n": -1}
    original_update, original_sched = torch.amp.GradScaler.update, LRScheduler.step

    def update(self, new_scale=None):
        found = None
        if self.is_enabled() and self._per_optimizer_states:
            found = sum(float(v.sum()) for state in self._per_optimizer_states.values()
                        for v in state.get("found_inf_per_device", {}).values())
        original_update(self, new_scale)
        scale = float(self._scale) if self.is_enabled() and self._scale is not None else 1.0
        log.append({"epoch": max(epoch["n"], 0), "scale": scale, "found_inf": bool(found)})

    def sched_step(self, *args, **kwargs):
        epoch["n"] += 1  # __init__ calls step() once: epoch 0 starts there
        return original_sched(self, *args, **kwargs)

    torch.amp.GradScaler.update, LRScheduler.step = update, sched_step
    try:
        yield
    finally:
        torch.amp.GradScaler.update, LRScheduler.step = original_update, original_sched


@contextlib.contextmanager
def scaled_attention_input(scale: float):
    """Every transformer layer's input (inside each C3TR) multiplied by `scale`: larger activations
    entering the attention. Not the C3TR's own input: its first conv's BatchNorm, in training
    mode, normalises any scale away (x256 there left plain yolov5 unchanged on an H100)."""
    if scale == 1.0:
        yield
        return

    def pre_hook(module, args):
        # By name: yolov5's TransformerLayer and nanops.nn's drop-in alike.
        if type(module).__name__ == "TransformerLayer":
            return (args[0] * scale,) + tuple(args[1:])
        return None

    handle = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def amp_forced_on(calls: list[str]):
    """yolov5's train.py asks check_amp(model) whether to use AMP; answer yes and record it."""
    train_module = quiet_yolov5_import("yolov5.train")
    original = train_module.check_amp

    def check_amp(model):
        calls.append(next(model.parameters()).device.type)
        return True

    train_module.check_amp = check_amp
    try:
        yield
    finally:
        train_module.check_amp = original


def overflow_scale(cfg: Path, img: int, batch: int, device: str) -> tuple[float | None, list[dict]]:
    """The smallest attention input scale at which plain yolov5's forward under float16 autocast gives
    a non-finite output while the same model with nanops' attention does not; and the probes."""
    import copy

    import nanops

    Model = quiet_yolov5_import("yolov5.models.yolo").Model
    torch.manual_seed(0)
    with contextlib.redirect_stdout(None):
        base = Model(str(cfg), ch=3, nc=1).to(device).train()
    x = torch.rand(batch, 3, img, img, device=device)

    def finite_forward(model, scale) -> bool:
        with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.float16), \
                scaled_attention_input(scale):
            return all(bool(torch.isfinite(o).all()) for o in model(x))

    probes = []
    for scale in (2.0 ** k for k in range(8, 15)):
        ours = copy.deepcopy(base)
        nanops.patch(ours)
        plain_ok, ours_ok = finite_forward(copy.deepcopy(base), scale), finite_forward(ours, scale)
        probes.append({"scale": scale, "plain_finite": plain_ok, "nanops_finite": ours_ok})
        print(f"probe: attention input x{scale:g}: plain forward finite {plain_ok}, nanops forward finite {ours_ok}")
        if not plain_ok and ours_ok:
            return scale, probes
    return None, probes


def results_rows(save_dir: Path) -> list[dict]:
    with (save_dir / "results.csv").open() as f:
        rows = [{k.strip(): v.strip() for k, v in r.items()} for r in csv.DictReader(f)]
    return [{"train_loss": sum(float(r[f"train/{k}_loss"]) for k in ("box", "obj", "cls")),
             "val_loss": sum(float(r[f"val/{k}_loss"]) for k in ("box", "obj", "cls")),
             "map50": float(r["metrics/mAP_0.5"])} for r in rows]


def weights_finite(save_dir: Path) -> bool:
    ckpt = torch.load(save_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)
    tensors = [t for t in ckpt["model"].state_dict().values() if t.is_floating_point()]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def train_once(which: str, flags: dict, scale: float) -> dict:
    from nanops.yolov5 import run, run_plain

    updates: list[dict] = []
    amp_checks: list[str] = []
    t0 = time.perf_counter()
    with recorded_scaler_updates(updates), scaled_attention_input(scale), amp_forced_on(amp_checks):
        if which == "plain":
            save_dir = run_plain(name=f"plain-s{scale:g}", **flags)
        else:
            save_dir = Path(run(name=f"nanops-s{scale:g}", **flags).save_dir)
    epochs = results_rows(save_dir)
    for e, row in enumerate(epochs):
        mine = [u for u in updates if u["epoch"] == e]
        row.update(epoch=e, skipped=sum(u["found_inf"] for u in mine), steps=len(mine),
                   scale=mine[-1]["scale"] if mine else None)
    return {"run": which, "attention_input_scale": scale, "seconds": round(time.perf_counter() - t0, 1),
            "amp": "cuda" in amp_checks, "weights_finite": weights_finite(save_dir), "epochs": epochs}


def finite_run(result: dict) -> bool:
    return result["weights_finite"] and all(math.isfinite(e["val_loss"]) for e in result["epochs"])


def print_table(results: list[dict]) -> None:
    for r in results:
        print(f"\n{r['run']} (attention input x{r['attention_input_scale']:g}, AMP {r['amp']}, {r['seconds']} s, "
              f"weights finite: {r['weights_finite']})")
        print(f"{'epoch':>5} {'train loss':>11} {'val loss':>10} {'mAP@.5':>8} {'skipped':>9} {'scale':>10}")
        for e in r["epochs"]:
            print(f"{e['epoch']:>5} {e['train_loss']:>11.4g} {e['val_loss']:>10.4g} {e['map50']:>8.4f} "
                  f"{e['skipped']:>4}/{e['steps']:<4} {e['scale'] if e['scale'] is not None else '-':>10}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--img", type=int, default=320)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--attention-input-scale", default="auto",
                        help="auto (plain at x1 first, probe if it stays finite), probe (skip the x1 run), or S")
    args = parser.parse_args(argv)
    args.device_name = "cpu" if args.device == "cpu" else f"cuda:{args.device}" if args.device.isdigit() else args.device
    prepare_environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, cfg, hyp = demo_files(out, args.images, args.img, width=None)
    flags = dict(data=str(data), cfg=str(cfg), hyp=str(hyp), weights="", epochs=args.epochs, batch_size=args.batch,
                 imgsz=args.img, workers=2, device=args.device, project=str(out / "runs"), exist_ok=True,
                 noplots=True, seed=0)
    results, probes = [], []
    scale = 1.0 if args.attention_input_scale in ("auto", "probe") else float(args.attention_input_scale)
    if args.attention_input_scale == "auto":
        results.append(train_once("plain", flags, 1.0))
    if args.attention_input_scale == "probe" or (results and finite_run(results[0])):
        found, probes = overflow_scale(cfg, args.img, args.batch, args.device_name)
        scale = found if found is not None else 256.0
        print(f"both runs with every attention input x{scale:g}"
              + ("" if found is not None else " (no probed scale broke plain alone)"))
    if not results or scale != 1.0:
        results.append(train_once("plain", flags, scale))
    results.append(train_once("nanops", flags, scale))
    print_table(results)
    plain, ours = results[-2], results[-1]
    verdict = {"plain_nonfinite": not finite_run(plain), "nanops_finite": finite_run(ours),
               "map_at_least_plain": ours["epochs"][-1]["map50"] >= plain["epochs"][-1]["map50"]}
    summary = {"device": torch.cuda.get_device_name() if args.device != "cpu" else "cpu",
               "torch": torch.__version__, "amp": args.device != "cpu", "scale_probes": probes, "results": results,
               "verdict": verdict}
    (out / "seed_training.json").write_text(json.dumps(summary, indent=1))
    print(f"\nverdict: {verdict}")
    return 0 if verdict["nanops_finite"] else 1


if __name__ == "__main__":
    sys.exit(main())
