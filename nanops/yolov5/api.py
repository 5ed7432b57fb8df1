"""yolov5's training from Python: `nanops.yolov5.train(**kwargs)` (protected) and `run_plain`
(yolov5 exactly as it runs, the baseline of the demo and the tests), both with yolov5.train.run's
keyword arguments."""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from ..training import checkpoint_loading
from .protection import Protection
from .shims import prepare_environment, quiet_yolov5_import
from .swaps import installed

POLICY_ENV = "NANOPS_ON_DIVERGENCE"
HEADROOM_ENV = "NANOPS_ON_HEADROOM"


@contextlib.contextmanager
def argv(args: list[str]) -> Iterator[None]:
    """sys.argv as yolov5's parser will read it, for the duration."""
    saved = sys.argv
    sys.argv = args
    try:
        yield
    finally:
        sys.argv = saved


def protected_main(opt, on_divergence: str = "warn", on_headroom: str = "warn") -> Protection:
    """yolov5.train.main(opt) under nanops; returns the run's Protection."""
    yolov5_train = quiet_yolov5_import("yolov5.train")
    protection = Protection(opt, on_divergence, on_headroom)
    with installed(protection):
        yolov5_train.main(opt, callbacks=protection.callbacks())
    return protection


def options(kwargs: dict):
    """yolov5's defaults (its parser, not our process's argv) overridden by kwargs, as its run()."""
    prepare_environment()
    yolov5_train = quiet_yolov5_import("yolov5.train")
    with argv([sys.argv[0]]):
        opt = yolov5_train.parse_opt(True)
    for key, value in kwargs.items():
        setattr(opt, key, value)
    return opt


def run(**kwargs) -> object:
    """yolov5.train.run(**kwargs) protected by nanops (`nanops_on_divergence`: warn, stop or
    rollback; `nanops_on_headroom`: warn, promote, stop or off); returns yolov5's opt namespace
    with `nanops_skipped` (SkippedStep list), `nanops_unsaved`, `nanops_promoted`,
    `nanops_divergences` and `nanops_headroom` (the headroom reports) added."""
    policy = kwargs.pop("nanops_on_divergence", os.environ.get(POLICY_ENV, "warn"))
    headroom = kwargs.pop("nanops_on_headroom", os.environ.get(HEADROOM_ENV, "warn"))
    protection = protected_main(options(kwargs), policy, headroom)
    used = protection.opt  # yolov5 builds a new opt on --resume
    used.nanops_skipped = protection.skips
    used.nanops_unsaved = protection.unsaved
    used.nanops_promoted = protection.promoted
    used.nanops_divergences = protection.divergences
    used.nanops_headroom = protection.headroom_notes
    return used


def run_plain(**kwargs) -> Path:
    """yolov5.train.run(**kwargs) exactly as yolov5 runs it; returns its save_dir."""
    opt = options(kwargs)
    from yolov5.utils.callbacks import Callbacks

    with checkpoint_loading():  # yolov5's own checkpoints load; no code from a file runs
        sys.modules["yolov5.train"].main(opt, callbacks=Callbacks())
    return Path(opt.save_dir)
