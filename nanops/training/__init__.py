"""Training protection, over the ops: a non-finite step never reaches weights, optimizer state,
EMA or BatchNorm statistics, and the first non-finite module is named by replaying that step.

    guard.py     Guard and guarded_step: the protected optimizer step of any loop
    scaler.py    GradScaler: torch's, plus skips with AMP off and BatchNorm restore
    snapshot.py  BatchNorm running statistics kept and restored on the device
    locate.py    replay of a skipped step (locate_step, locate_forward)
    watch.py     per-module NaN/Inf checks of forward outputs and backward gradients
    skips.py     the skipped-step report (console line, CSV) the framework wings share
    inject.py    a non-finite input on a chosen training forward, for demos and tests

Imports run one way: this package uses the ops layer (nanops.ops, nanops.clip), never the
framework wings (nanops.yolov5, nanops.ultralytics) or nanops.tools.
"""
from .guard import Guard, StepResult, guarded_step
from .locate import RngState, locate_forward, locate_step
from .scaler import GradScaler
from .snapshot import NormBufferSnapshot
from .watch import Finding, Watch, watch

__all__ = [
    "Finding",
    "GradScaler",
    "Guard",
    "NormBufferSnapshot",
    "RngState",
    "StepResult",
    "Watch",
    "guarded_step",
    "locate_forward",
    "locate_step",
    "watch",
]
