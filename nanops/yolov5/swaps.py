"""The names yolov5's train.py looks up, pointed at nanops for the duration of a run.

Nothing of yolov5 is copied or edited. While `installed(protection)` is entered:
  * `train`: the Protection learns of each run (--evolve generations, --resume);
  * `Callbacks`: --evolve makes new Callbacks() per generation; each gets nanops' hooks;
  * `Model` / `attempt_load`: the built model's attention is switched to nanops' (same
    Parameters; patched modules pickle as torch's, so last.pt/best.pt stay plain yolov5);
  * `torch.cuda.amp.GradScaler`: nanops.GradScaler, which skips a non-finite step with AMP on
    *and off*; its `unscale_` folds the micro-batch window's flag in, its `step` replays a skip
    on every rank under DDP;
  * `torch.nn.utils.clip_grad_norm_`: nanops' overflow-free clip, which leaves non-finite
    grads untouched (its norm feeds the divergence watch);
  * `ModelEMA.update`: not applied after a skipped step;
  * `ComputeLoss`: yolov5's own, each training loss checked as it is formed;
  * `torch.save`: a checkpoint whose model or EMA is not finite as saved is not written;
and every checkpoint is loaded by nanops' policy (no code from the file runs).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .. import patching
from ..clip import clip_grad_norm_
from ..training import GradScaler, checkpoint_loading
from .protection import Protection
from .saving import guarded_save


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


def _train(p: Protection, original):
    def train(hyp, opt, device, callbacks):
        p.begin_run(hyp, opt)
        return original(hyp, opt, device, callbacks)
    return train


def _built(p: Protection, build, trained: bool):
    def patched_build(*args, **kwargs):
        model = build(*args, **kwargs)
        patching.patch(model)
        if trained:
            p.model_built(model)
        return model
    return patched_build


def _scaler(p: Protection):
    def make(*args, **kwargs) -> GradScaler:
        scaler = GradScaler("cuda", *args, **kwargs)
        p.scaler_made(scaler)
        return scaler
    return make


def _loss(p: Protection, cls):
    def build(*args, **kwargs):
        compute_loss = cls(*args, **kwargs)
        p.compute_loss = compute_loss

        def checked(pred, targets):
            loss, items = compute_loss(pred, targets)
            if torch.is_grad_enabled():  # training, not validation
                items = p.loss_computed(loss, items, targets)
            return loss, items
        return checked
    return build


def _unscale(p: Protection, original):
    def unscale_(scaler, optimizer):
        p.unscaling(scaler, optimizer)
        return original(scaler, optimizer)
    return unscale_


def _step(p: Protection, original):
    def step(scaler, optimizer, *args, **kwargs):
        result = original(scaler, optimizer, *args, **kwargs)
        p.stepped(scaler)
        return result
    return step


def _clip(p: Protection):
    def clip(parameters, max_norm, *args, **kwargs):
        norm = clip_grad_norm_(parameters, max_norm, *args, **kwargs)
        p.clipped(norm)
        return norm
    return clip


def _ema_update(p: Protection, original):
    def update(ema, model):
        if p.ema_may_update(ema):
            return original(ema, model)
    return update


@contextlib.contextmanager
def installed(p: Protection) -> Iterator[None]:
    """train.py's names pointed at `p` for the duration of the run."""
    import yolov5.train as yolov5_train
    from yolov5.utils.torch_utils import ModelEMA

    with contextlib.ExitStack() as stack:
        if p.session.world_size > 1 or _launched_distributed():
            # Each rank replays its own batches after a skip: remember the images it trained on.
            stack.callback(p.session.remember_inputs().remove)
        stack.enter_context(checkpoint_loading())
        stack.enter_context(_swapped(
            (yolov5_train, "train", _train(p, yolov5_train.train)),
            (yolov5_train, "Callbacks", p.callbacks),
            (yolov5_train, "Model", _built(p, yolov5_train.Model, trained=True)),
            (yolov5_train, "attempt_load", _built(p, yolov5_train.attempt_load, trained=False)),
            (torch.cuda.amp, "GradScaler", _scaler(p)),
            (GradScaler, "unscale_", _unscale(p, GradScaler.unscale_)),
            (GradScaler, "step", _step(p, GradScaler.step)),
            (torch.nn.utils, "clip_grad_norm_", _clip(p)),
            (ModelEMA, "update", _ema_update(p, ModelEMA.update)),
            (yolov5_train, "ComputeLoss", _loss(p, yolov5_train.ComputeLoss)),
            (torch, "save", guarded_save(torch.save, p.checkpoints.refused)),
        ))
        yield


def _launched_distributed() -> bool:
    """torch.distributed.run's environment (the process group is made later, in yolov5's main)."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1

