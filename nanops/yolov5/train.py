"""`nanops train`: the yolov5 package's own train.py, protected from outside.

Nothing of yolov5 is copied or edited. For the duration of the run nanops swaps in, through
the names train.py looks up:
  * `Model` / `attempt_load`: the built model's attention is switched to nanops' (same
    Parameters; patched modules pickle as torch's, so last.pt/best.pt stay plain yolov5);
  * `torch.cuda.amp.GradScaler`: nanops.GradScaler, which skips a non-finite step with AMP on
    *and off* and restores the BatchNorm statistics the corrupt batch's forward moved;
  * `torch.nn.utils.clip_grad_norm_`: nanops' overflow-free clip, which leaves non-finite
    grads untouched;
  * `ModelEMA.update`: not applied after a skipped step;
  * `ComputeLoss`: yolov5's own, kept so that a skipped step can be replayed.
Each skipped step is logged (epoch, iteration, and the first non-finite module, found by replaying
the batch's forward, loss and backward from the step's RNG state and loss scale with every module
checked; healthy steps run no hooks), written to `<save_dir>/nanops_skipped_steps.csv` and
summed up at the end.

Under `torch.distributed.run` (yolov5's multi-GPU DDP) every rank is protected: each rank checks
its own micro-batches and restores its own BatchNorm statistics, the ranks agree on each skip
with one small all_reduce of the window's flag, and after a skipped step each rank replays its
own window's batches (locally, no collective); rank 0, the only rank yolov5 logs from, reports
the skip with the finding and the rank it came from, and writes the one CSV.
"""
from __future__ import annotations

import contextlib
import math
import os
import pickle
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import _distributed, patching
from ..clip import clip_grad_norm_
from ..training import inject
from ..training.divergence import POLICIES, DivergenceWatch, Diverged, RollbackState, likely_cause, message
from ..training.locate import RngState, _cuda_devices
from ..training.promote import promote_named
from ..training.scaler import GradScaler
from ..training.skips import SKIPPED_CSV, SkippedStep, SkipReport, agree_on_where, describe, replay_where
from ..training.window import MicroBatchWindow
from .hyp import HypError, hyp_warnings
from .env import UntrustedCheckpoint, checkpoint_loading, prepare_environment, quiet_yolov5_import

__all__ = ["SKIPPED_CSV", "SkippedStep", "inject_nonfinite_input", "main", "run", "run_plain"]


@contextlib.contextmanager
def _swapped(*swaps: tuple[object, str, object]) -> Iterator[None]:
    """Sets obj.name = value for each swap, restoring the originals on exit."""
    originals = [(obj, name, getattr(obj, name)) for obj, name, _ in swaps]
    try:
        for obj, name, value in swaps:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(originals):
            setattr(obj, name, value)


class Protection:
    """The state of one protected `yolov5 train` run (every --evolve generation, a --resume): its
    model, scaler, micro-batch window, skips and checkpoints."""

    def __init__(self, opt, on_divergence: str = "warn") -> None:
        if on_divergence not in POLICIES:
            raise ValueError(f"nanops train: --nanops-on-divergence must be one of {', '.join(POLICIES)}, got "
                             f"{on_divergence!r}")
        self.on_divergence = on_divergence
        self.opt = opt  # replaced by the opt train() is given (main rebuilds it on --resume)
        self.model: torch.nn.Module | None = None
        self.scaler: GradScaler | None = None
        self.window: MicroBatchWindow | None = None
        self.report = SkipReport(quiet_yolov5_import("yolov5.utils.general").LOGGER)
        self.generation = -1
        self.epoch = -1
        self.compute_loss = None
        self.unsaved: list[str] = []  # checkpoints not written because their state was not finite
        self.promoted: list[str] = []  # modules run in float32 after a float16 overflow
        self.divergence = DivergenceWatch()
        self.divergences: list[str] = []  # the messages given
        self.hyp_advice: list[str] = []
        self.optimizer = None
        self.ema = None
        self._rollback = RollbackState() if on_divergence == "rollback" else None
        self._last_loss: torch.Tensor | None = None
        self._last_norm: torch.Tensor | None = None
        self._skip_places: dict[int, tuple[int, int]] = {}  # optimizer step -> (epoch, iteration) of skips
        self._steps_seen = 0
        self._skips_reported = 0
        self._window_reported = False
        self._rng: RngState | None = None
        self._rng_devices: list[int] | None = None  # found at the first batch, on the training device
        # Under DDP: this rank's micro-batches of the open window (images, targets, flag), to replay
        # after a skip, and the finding the ranks agreed on for rank 0's report.
        self._last_imgs: torch.Tensor | None = None
        self._window_inputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._ddp_finding: str | None = None

    # --- what train.py calls --------------------------------------------------------------
    def _train(self, original):
        """train(hyp, opt, device, callbacks): once per run, once per --evolve generation."""
        def train(hyp, opt, device, callbacks):
            if self.on_divergence == "rollback" and _distributed.world_size() > 1:
                # Each rank would restore its own copy, and DDP never re-syncs parameters.
                raise ValueError("nanops train: --nanops-on-divergence rollback is for single-process runs; "
                                 "under torch.distributed use stop (or warn)")
            self.opt = opt
            self.generation += 1
            self.epoch = -1
            self.model = self.scaler = self.window = None
            self._steps_seen = self._skips_reported = 0
            self._window_reported = False
            if getattr(opt, "resume", False) or self.generation > 0:
                self.report.keep_existing(opt.save_dir)  # a resumed run, a later generation: append
            self.report.steps = []
            self.divergence = DivergenceWatch()
            self._skip_places = {}
            self._check_hyp(hyp, getattr(opt, "optimizer", "SGD"))
            return original(hyp, opt, device, callbacks)
        return train

    def _check_hyp(self, hyp, optimizer: str) -> None:
        """doctor's hyp rules, run on this run's hyp: each warning once, kept as the likely cause
        should the run diverge."""
        import yaml

        try:
            values = hyp if isinstance(hyp, dict) else yaml.safe_load(Path(hyp).read_text())
            self.hyp_advice = hyp_warnings(values, optimizer) if isinstance(values, dict) else []
        except (OSError, HypError, yaml.YAMLError):
            self.hyp_advice = []
        for advice in self.hyp_advice:
            self.report.logger.warning(f"nanops: hyp warning: {advice}")

    def _patched(self, build, trained: bool = False):
        """`build` (Model, attempt_load) whose models get nanops' attention; the trained one is
        kept, and watched micro-batch by micro-batch."""
        def patched_build(*args, **kwargs):
            model = build(*args, **kwargs)
            patching.patch(model)
            if trained:
                self.model = model
            return model
        return patched_build

    def _remember_imgs(self, module, args) -> None:
        # The training forward's images (a reference, no copy), for a replay under DDP. A global
        # hook, so that nothing of nanops is attached to the model yolov5 pickles into checkpoints.
        if module is self.model and module.training and torch.is_grad_enabled() and args and isinstance(
                args[0], torch.Tensor):
            self._last_imgs = args[0]

    def _scaler_factory(self, *args, **kwargs) -> GradScaler:
        # BatchNorm statistics are kept per micro-batch by the window (a skipped accumulated step
        # must not undo the healthy micro-batches of its window), not by scaler.protect.
        self.scaler = GradScaler("cuda", *args, **kwargs)
        return self.scaler

    def _loss_factory(self, cls):
        def build(*args, **kwargs):
            compute_loss = cls(*args, **kwargs)
            self.compute_loss = compute_loss

            def checked(pred, targets):
                loss, items = compute_loss(pred, targets)
                if self.window is not None and torch.is_grad_enabled():  # training, not validation
                    self._last_loss = loss.detach()
                    bad = self.window.check(loss, items)
                    items = self.window.counted_items(items, bad)
                    if _distributed.world_size() > 1 and self._last_imgs is not None:
                        self._window_inputs.append((self._last_imgs, targets, bad))
                return loss, items

            return checked
        return build

    def _ema_update(self, original):
        def update(ema, model):
            self.ema = ema
            if self.scaler is not None and self.scaler.last_step_skipped:
                return  # the model is as before the batch: nothing to average in
            return original(ema, model)
        return update

    def _scaler_unscale(self, original):
        """nanops.GradScaler.unscale_ (train.py's, or step's own), with the accumulation window's
        flag folded into the step's found_inf: a non-finite micro-batch skips its window's step."""
        def unscale_(scaler, optimizer):
            if scaler is self.scaler:
                self.optimizer = optimizer
                if self.window is not None:
                    self.window.settle()  # the window's last backward is done (yolov5 settles on rank 0 only)
            flag = self.window.close() if self.window is not None and scaler is self.scaler else None
            if flag is not None:
                scaler.skip_if(flag)
            return original(scaler, optimizer)
        return unscale_

    def _scaler_step(self, original):
        """GradScaler.step, run by every rank: under DDP a skipped step is replayed on each rank from
        its own window's batches, and the ranks' findings gathered for rank 0's report."""
        def step(scaler, optimizer, *args, **kwargs):
            result = original(scaler, optimizer, *args, **kwargs)
            if scaler is self.scaler and _distributed.world_size() > 1:
                if scaler.last_step_skipped:  # the same on every rank: found_inf was agreed
                    self._ddp_finding = self._replay_on_every_rank()
                self._window_inputs = []
            return result
        return step

    def _replay_on_every_rank(self) -> str:
        scale = self.scaler.scale_of_last_skip if self.scaler.is_enabled() else None
        where, overflow = describe(None), None
        # This rank's flagged micro-batches first; the grads were all-reduced, so a rank whose
        # batches all looked finite may still hold the one that overflowed in the backward.
        for imgs, targets, _ in sorted(self._window_inputs, key=lambda item: not bool(item[2])):
            where, overflow = self._replay(self.model, imgs, targets, scale)
            if not where.startswith("not reproduced"):
                break
        return agree_on_where(self.model, where, overflow, self.promoted)

    def _clip(self, original):
        """nanops' clip_grad_norm_, its total norm kept (on the device) for the divergence watch."""
        def clip(parameters, max_norm, *args, **kwargs):
            self._last_norm = original(parameters, max_norm, *args, **kwargs)
            return self._last_norm
        return clip

    def _save(self, original):
        """torch.save of yolov5's checkpoints (a dict holding 'model' and 'epoch'): written only when
        the model and EMA are finite as saved (yolov5 saves them in float16, where 1e5 is inf);
        otherwise the previous file is kept and the first offending tensor named."""
        def save(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and "model" in obj and "epoch" in obj:
                bad = _first_nonfinite_tensor(obj)
                if bad is not None:
                    self.unsaved.append(str(f))
                    keep = "kept the previous file" if Path(str(f)).exists() else "wrote nothing"
                    self.report.logger.warning(f"nanops: not writing {f}: {bad} is not finite as saved; {keep}")
                    return None
            return original(obj, f, *args, **kwargs)
        return save

    # --- yolov5 callbacks -----------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.epoch += 1
        self._epoch_first_ni = None  # the run's iteration number of this epoch's first batch
        self._window_inputs = []  # zero_grad cuts the window
        self._window_reported = False
        if self.window is not None:
            self.window.close()  # zero_grad drops the cut window's grads; its BN updates are settled
            self.window.new_epoch()

    def on_train_batch_start(self) -> None:
        # The RNG state the batch's forward starts from (a host copy, no sync): a replay of a
        # skipped step draws what the step drew.
        if self.model is None:
            return
        if self.window is None:  # before the first forward: its snapshot is the state before training
            self.window = MicroBatchWindow(self.model)
        self.window.settle()  # the previous micro-batch's, on ranks where on_train_batch_end does not run
        if self._rng_devices is None:
            self._rng_devices = _cuda_devices(self.model)
        self._rng = RngState.capture(self._rng_devices)

    def on_train_batch_end(self, model, ni, imgs, targets, paths, vals) -> None:
        if self.scaler is None:
            return
        if getattr(self, "_epoch_first_ni", None) is None:
            self._epoch_first_ni = int(ni)
        batch = int(ni) - self._epoch_first_ni  # within the epoch, from 0
        if self.window is not None:
            self.window.settle()  # after the batch's backward: its BatchNorm updates kept or undone
        stepped = self.scaler.total_steps != self._steps_seen
        self._steps_seen = self.scaler.total_steps
        if stepped:
            self._record_step(int(ni))
        # yolov5's progress bar has just read the losses on the host: this read costs no wait.
        batch_bad = self.window is not None and self.window.last_bad is not None and bool(self.window.last_bad)
        if self.window is not None:
            self.window.last_bad = None
        new_skip = self.scaler.skipped_steps != self._skips_reported
        self._skips_reported = self.scaler.skipped_steps
        explained = self._window_reported  # the window's bad batch was reported: its step's skip is that
        if stepped:
            self._window_reported = False
        if batch_bad:
            self.report.add(SkippedStep(self.epoch, int(ni), self._replay_here(model, imgs, targets, None),
                                        _suspect_images(imgs, paths), self.generation, "batch", batch),
                            self.opt.save_dir)
            self._window_reported = not stepped
        elif stepped and new_skip and not explained:
            if self._ddp_finding is not None:  # every rank replayed its batches at the step
                where, self._ddp_finding = self._ddp_finding, None
                paths = []  # rank 0 holds only its own batch's paths
            else:
                scale = self.scaler.scale_of_last_skip if self.scaler.is_enabled() else None
                where = self._replay_here(model, imgs, targets, scale)
            self.report.add(SkippedStep(self.epoch, int(ni), where, list(paths), self.generation, "step", batch),
                            self.opt.save_dir)

    def _record_step(self, ni: int) -> None:
        """The step just taken (or skipped), into the divergence watch: device tensors only."""
        skipped = self.scaler.last_step_skipped  # read by the step already
        if skipped:
            self._skip_places[self.scaler.total_steps - 1] = (self.epoch, ni)
        amp = self.scaler.is_enabled()
        flag = torch.tensor([float(skipped)])
        self.divergence.record(flag, self._last_loss, self._last_norm, self.scaler._scale if amp else None)
        if self._rollback is not None and not skipped:
            self._rollback.maybe_take(self.scaler.total_steps, self._state_objects())

    def _state_objects(self) -> dict:
        return {"model": self.model, "ema": self.ema.ema if self.ema is not None else None, "optimizer": self.optimizer}

    def _replay_here(self, model, imgs, targets, loss_scale) -> str:
        """_replay on rank 0 alone (yolov5's rank-0-only callback), its overflowing module promoted."""
        where, overflow = self._replay(model, imgs, targets, loss_scale)
        if overflow is not None:
            self.promoted += promote_named(_distributed.unwrap(model), [overflow])
        return where

    def _replay(self, model, imgs, targets, loss_scale) -> tuple[str, str | None]:
        """The first non-finite module of this micro-batch: train.py's forward, loss and backward
        again, from the batch's RNG state, on this rank's module alone (no collective). Under AMP,
        also the module whose forward overflowed from finite inputs (to be run in float32 from
        then on, said in the report), else None."""
        model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        amp = self.scaler.is_enabled()
        device = imgs.device
        compute_loss = self.compute_loss

        def loss():
            with torch.autocast(device.type, enabled=amp):
                return compute_loss(model(imgs), targets.to(device))[0]

        return replay_where(model, loss, loss_scale=loss_scale, rng_state=self._rng, amp=amp)

    def on_train_epoch_end(self, epoch) -> None:
        self._handle(self.divergence.read())

    def on_fit_epoch_end(self, log_vals, epoch, best_fitness, fi) -> None:
        values = [float(v) for v in log_vals[:10]]
        train_finite = all(math.isfinite(v) for v in values[:3])
        val_finite = all(math.isfinite(v) for v in values[7:10])
        event = self.divergence.validation(val_finite, train_finite, self.scaler.total_steps if self.scaler else 0)
        if event is not None:
            self._handle([event])

    def _handle(self, events) -> None:
        amp = self.scaler is not None and self.scaler.is_enabled()
        finding = self.report.steps[-1].first_nonfinite if self.report.steps else None
        for event in events:
            place = self._skip_places.get(event.step)
            where = f"(from epoch {place[0]}, iteration {place[1]})" if place else f"(epoch {self.epoch})"
            text = message(event, likely_cause(event, amp, self.hyp_advice, finding), where, finding)
            if self.promoted:
                text += f" Promoted to float32 so far: {', '.join(self.promoted)}."
            self.divergences.append(text)
            if self.on_divergence == "stop":
                # Said once, by whoever catches it (`nanops train` prints it and exits 3).
                raise Diverged(text + " Stopping (--nanops-on-divergence stop); the last checkpoint written stays.")
            if self.on_divergence == "rollback" and self._rollback is not None:
                step = self._rollback.restore(event.step, self._state_objects())
                if step is not None:
                    if self.window is not None:
                        self.window.resnapshot()
                    text += f" Rolled back to optimizer step {step}'s model, EMA and optimizer, lr divided by 10."
            self.report.logger.warning(text)

    def on_train_end(self, last, best, epoch, results) -> None:
        note = ""
        if self.unsaved:
            note = (f"{len(self.unsaved)} checkpoint write(s) refused because the model or EMA was not finite as "
                    f"saved (the last good files were kept): {', '.join(self.unsaved[:3])}")
        if self.promoted:
            note = (note + " " if note else "") + f"Run in float32 after a float16 overflow: {', '.join(self.promoted)}."
        self.report.finish(self.opt.save_dir, self.scaler.total_steps if self.scaler is not None else 0,
                           self.scaler.skipped_steps if self.scaler is not None else 0, note)

    def callbacks(self):
        from yolov5.utils.callbacks import Callbacks

        callbacks = Callbacks()
        for hook in ("on_train_epoch_start", "on_train_batch_start", "on_train_batch_end", "on_train_epoch_end",
                     "on_fit_epoch_end", "on_train_end"):
            callbacks.register_action(hook, name="nanops", callback=getattr(self, hook))
        return callbacks

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """train.py's names pointed at nanops for the duration of the run."""
        import yolov5.train as yolov5_train
        from yolov5.utils.torch_utils import ModelEMA

        hook = None
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torch.distributed.run's: remember each rank's images
            hook = torch.nn.modules.module.register_module_forward_pre_hook(self._remember_imgs)
        with _removed_after(hook), checkpoint_loading(), _swapped(
            (yolov5_train, "train", self._train(yolov5_train.train)),
            (yolov5_train, "Callbacks", self.callbacks),  # --evolve makes new Callbacks() per generation
            (yolov5_train, "Model", self._patched(yolov5_train.Model, trained=True)),
            (yolov5_train, "attempt_load", self._patched(yolov5_train.attempt_load)),
            (torch.cuda.amp, "GradScaler", self._scaler_factory),
            (GradScaler, "unscale_", self._scaler_unscale(GradScaler.unscale_)),
            (GradScaler, "step", self._scaler_step(GradScaler.step)),
            (torch.nn.utils, "clip_grad_norm_", self._clip(clip_grad_norm_)),
            (ModelEMA, "update", self._ema_update(ModelEMA.update)),
            (yolov5_train, "ComputeLoss", self._loss_factory(yolov5_train.ComputeLoss)),
            (torch, "save", self._save(torch.save)),
        ):
            yield


@contextlib.contextmanager
def _removed_after(handle) -> Iterator[None]:
    try:
        yield
    finally:
        if handle is not None:
            handle.remove()


def _suspect_images(imgs: torch.Tensor, paths) -> list[str]:
    """The paths of the batch's images holding a NaN/Inf pixel, or every path of the batch when
    none does (the non-finite value arose inside the model or the loss)."""
    rows = (~torch.isfinite(imgs.detach()).flatten(1).all(1)).nonzero().flatten().tolist()
    return [str(paths[i]) for i in rows] if rows else [str(p) for p in paths]


def _first_nonfinite_tensor(ckpt: dict) -> str | None:
    """The first tensor of a yolov5 checkpoint's model or EMA (as it will be written) holding
    NaN/Inf, as "model.<key>", or None when all are finite. One fused check per module."""
    from ..ops import all_finite, nonfinite_counts

    for part in ("model", "ema"):
        module = ckpt.get(part)
        if not isinstance(module, torch.nn.Module):
            continue
        items = [(k, t) for k, t in module.state_dict().items() if t.is_floating_point()]
        if not items or bool(all_finite([t for _, t in items])):
            continue
        counts = nonfinite_counts([t for _, t in items])
        first = int((counts.sum(1) > 0).nonzero()[0])
        return f"{part}.{items[first][0]}"
    return None


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _train(opt, on_divergence: str = "warn") -> Protection:
    import yolov5.train as yolov5_train

    protection = Protection(opt, on_divergence)
    with protection.installed():
        yolov5_train.main(opt, callbacks=protection.callbacks())
    return protection


def _options(kwargs: dict):
    """yolov5's defaults (its parser, not our process's argv) overridden by kwargs, as its run()."""
    prepare_environment()
    yolov5_train = quiet_yolov5_import("yolov5.train")
    with _argv([sys.argv[0]]):
        opt = yolov5_train.parse_opt(True)
    for key, value in kwargs.items():
        setattr(opt, key, value)
    return opt


def run(**kwargs) -> object:
    """yolov5.train.run(**kwargs) protected by nanops; returns yolov5's opt namespace, with
    `opt.nanops_skipped` (a list of SkippedStep) added."""
    policy = kwargs.pop("nanops_on_divergence", os.environ.get(POLICY_ENV, "warn"))
    opt = _options(kwargs)
    protection = _train(opt, policy)
    used = protection.opt  # yolov5 builds a new opt on --resume
    used.nanops_skipped = protection.report.steps
    used.nanops_unsaved = protection.unsaved
    used.nanops_promoted = protection.promoted
    used.nanops_divergences = protection.divergences
    return used


def run_plain(**kwargs) -> Path:
    """yolov5.train.run(**kwargs) exactly as yolov5 runs it (the baseline of the demo and tests);
    returns its save_dir."""
    from yolov5.utils.callbacks import Callbacks

    opt = _options(kwargs)
    with checkpoint_loading():  # yolov5's own checkpoints load; no code from a file runs
        sys.modules["yolov5.train"].main(opt, callbacks=Callbacks())
    return Path(opt.save_dir)


def main(argv: list[str]) -> int:
    """`nanops train [yolov5 train flags]`: exit status 0 when training finished."""
    prepare_environment()
    try:
        quiet_yolov5_import("yolov5.train")
    except ImportError as err:
        print(f"nanops train: needs the yolov5 package ({err}); install it with: pip install 'nanops[yolov5]'",
              file=sys.stderr)
        return 2
    import yolov5.train as yolov5_train

    try:
        policy, argv = _own_flags(argv)
    except ValueError as err:
        print(f"nanops train: {err}", file=sys.stderr)
        return 2
    with _argv(["nanops train", *argv]):
        opt = yolov5_train.parse_opt()  # yolov5's own parser: unknown flags get its usage and exit 2
    try:
        protection = _train(opt, policy)
    except UntrustedCheckpoint as err:  # one line: the file, what it names, the opt-out
        print(err, file=sys.stderr)
        return 2
    except (AssertionError, FileNotFoundError, pickle.UnpicklingError) as err:
        # yolov5 reports bad paths and arguments by assertion; its message, without our frames.
        print(f"nanops train: {err}", file=sys.stderr)
        return 2
    except Diverged as err:
        print(f"nanops train: {err}", file=sys.stderr)
        return 3
    if protection.unsaved:
        print(f"nanops train: the run ended with a model that could not be saved finite; {len(protection.unsaved)} "
              f"checkpoint write(s) were refused and the last good files kept ({protection.unsaved[-1]})",
              file=sys.stderr)
        return 1
    return 0


POLICY_ENV = "NANOPS_ON_DIVERGENCE"


def _own_flags(argv: list[str]) -> tuple[str, list[str]]:
    """nanops' own options, taken out before yolov5's parser sees the rest; all start with
    --nanops- so they can never clash with a yolov5 flag. --nanops-on-divergence warn|stop|rollback
    (default: $NANOPS_ON_DIVERGENCE, else warn)."""
    policy = os.environ.get(POLICY_ENV, "warn")
    rest, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--nanops-on-divergence" or arg.startswith("--nanops-on-divergence="):
            if "=" in arg:
                policy = arg.split("=", 1)[1]
            elif i + 1 < len(argv):
                policy, i = argv[i + 1], i + 1
            else:
                raise ValueError("--nanops-on-divergence needs a value: warn, stop or rollback")
        elif arg.startswith("--nanops-"):
            raise ValueError(f"unknown nanops option {arg} (there is --nanops-on-divergence)")
        else:
            rest.append(arg)
        i += 1
    if policy not in POLICIES:
        raise ValueError(f"--nanops-on-divergence must be one of {', '.join(POLICIES)}, got {policy!r}")
    return policy, rest


def inject_nonfinite_input(step: int, value: float = math.inf):
    """For demos and tests: the `step`-th training forward of any yolov5 model gets one
    non-finite pixel (as an overflowed image decode would give), in place in its input batch."""
    from yolov5.models.yolo import BaseModel

    return inject.inject_nonfinite_input(step, BaseModel, value)


class _CallableModule(types.ModuleType):
    """`nanops.yolov5.train` is this module (so `import nanops.yolov5.train as t` gives it) and the
    documented function train(**kwargs) (yolov5.train.run's signature): calling the module runs."""

    def __call__(self, **kwargs):
        """yolov5.train.run(**kwargs), protected by nanops; returns yolov5's opt namespace."""
        return run(**kwargs)


sys.modules[__name__].__class__ = _CallableModule
