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
"""
from __future__ import annotations

import contextlib
import math
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from .. import patching
from ..clip import clip_grad_norm_
from ..training import inject
from ..training.locate import RngState, _cuda_devices
from ..training.scaler import GradScaler
from ..training.skips import SKIPPED_CSV, SkippedStep, SkipReport, first_nonfinite
from .env import checkpoint_loading, prepare_environment, quiet_yolov5_import

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
    """The state of one protected yolov5 run: its models, its scaler, its skipped steps."""

    def __init__(self, opt) -> None:
        self.opt = opt
        self.model: torch.nn.Module | None = None
        self.scaler: GradScaler | None = None
        self.report = SkipReport(quiet_yolov5_import("yolov5.utils.general").LOGGER)
        self.epoch = -1
        self._reported_before = 0
        self.compute_loss = None
        self._rng: RngState | None = None
        self._rng_devices: list[int] | None = None  # found at the first batch, on the training device

    # --- what train.py calls --------------------------------------------------------------
    def _patched(self, build, trained: bool = False):
        """`build` (Model, attempt_load) whose models get nanops' attention; the trained one is
        kept for the scaler to protect."""
        def patched_build(*args, **kwargs):
            model = build(*args, **kwargs)
            patching.patch(model)
            if trained:
                self.model = model
            return model
        return patched_build

    def _scaler_factory(self, *args, **kwargs) -> GradScaler:
        scaler = GradScaler("cuda", *args, **kwargs)
        self._reported_before = len(self.report.steps)  # --evolve trains (and builds a scaler) again
        if self.model is not None:
            scaler.protect(self.model)
        self.scaler = scaler
        return scaler

    def _loss_factory(self, cls):
        def build(*args, **kwargs):
            self.compute_loss = cls(*args, **kwargs)
            return self.compute_loss
        return build

    def _ema_update(self, original):
        def update(ema, model):
            if self.scaler is not None and self.scaler.last_step_skipped:
                return  # the model is as before the batch: nothing to average in
            return original(ema, model)
        return update

    # --- yolov5 callbacks -----------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self.epoch += 1

    def on_train_batch_start(self) -> None:
        # The RNG state the batch's forward starts from (a host copy, no sync): a replay of a
        # skipped step draws what the step drew.
        if self.model is None:
            return
        if self._rng_devices is None:
            self._rng_devices = _cuda_devices(self.model)
        self._rng = RngState.capture(self._rng_devices)

    def on_train_batch_end(self, model, ni, imgs, targets, paths, vals) -> None:
        if self.scaler is None or self.scaler.skipped_steps == len(self.report.steps) - self._reported_before:
            return  # no step skipped since the last report
        model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
        amp = self.scaler.is_enabled()
        device = imgs.device

        def loss():  # train.py's forward and loss, on the same batch
            with torch.autocast(device.type, enabled=amp):
                return self.compute_loss(model(imgs), targets.to(device))[0]

        where = first_nonfinite(model, loss, loss_scale=self.scaler.scale_of_last_skip if amp else None,
                                rng_state=self._rng)
        self.report.add(SkippedStep(self.epoch, int(ni), where), self.opt.save_dir)

    def on_train_end(self, last, best, epoch, results) -> None:
        self.report.finish(self.opt.save_dir, self.scaler.total_steps if self.scaler is not None else 0)

    def callbacks(self):
        from yolov5.utils.callbacks import Callbacks

        callbacks = Callbacks()
        for hook in ("on_train_epoch_start", "on_train_batch_start", "on_train_batch_end", "on_train_end"):
            callbacks.register_action(hook, name="nanops", callback=getattr(self, hook))
        return callbacks

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """train.py's names pointed at nanops for the duration of the run."""
        import yolov5.train as yolov5_train
        from yolov5.utils.torch_utils import ModelEMA

        with checkpoint_loading(), _swapped(
            (yolov5_train, "Model", self._patched(yolov5_train.Model, trained=True)),
            (yolov5_train, "attempt_load", self._patched(yolov5_train.attempt_load)),
            (torch.cuda.amp, "GradScaler", self._scaler_factory),
            (torch.nn.utils, "clip_grad_norm_", clip_grad_norm_),
            (ModelEMA, "update", self._ema_update(ModelEMA.update)),
            (yolov5_train, "ComputeLoss", self._loss_factory(yolov5_train.ComputeLoss)),
        ):
            yield


@contextlib.contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def _train(opt) -> Protection:
    import yolov5.train as yolov5_train

    protection = Protection(opt)
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
    opt = _options(kwargs)
    opt.nanops_skipped = _train(opt).report.steps
    return opt


def run_plain(**kwargs) -> Path:
    """yolov5.train.run(**kwargs) exactly as yolov5 runs it (the baseline of the demo and tests);
    returns its save_dir."""
    from yolov5.utils.callbacks import Callbacks

    opt = _options(kwargs)
    with checkpoint_loading():  # torch >= 2.6 refuses yolov5's own checkpoints without an allow-list
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

    with _argv(["nanops train", *argv]):
        opt = yolov5_train.parse_opt()  # yolov5's own parser: unknown flags get its usage and exit 2
    try:
        _train(opt)
    except (AssertionError, FileNotFoundError, pickle.UnpicklingError) as err:
        # yolov5 reports bad paths and arguments by assertion; its message, without our frames.
        print(f"nanops train: {err}", file=sys.stderr)
        return 2
    return 0


def inject_nonfinite_input(step: int, value: float = math.inf):
    """For demos and tests: the `step`-th training forward of any yolov5 model gets one
    non-finite pixel (as an overflowed image decode would give), in place in its input batch."""
    from yolov5.models.yolo import BaseModel

    return inject.inject_nonfinite_input(step, BaseModel, value)
