"""Training protection, over the ops: a non-finite step never reaches weights, optimizer state,
EMA or BatchNorm statistics, and the first non-finite module is named by replaying that step.

    guard.py     Guard and guarded_step: the protected optimizer step of any loop
    window.py    gradient-accumulation windows checked micro-batch by micro-batch
    divergence.py  a lost run noticed from the step's own numbers; policies warn/stop/rollback
    promote.py   a module whose float16 forward overflowed runs in float32 from then on
    scaler.py    GradScaler: torch's, plus skips with AMP off and BatchNorm restore
    snapshot.py  BatchNorm running statistics kept and restored on the device
    locate.py    replay of a skipped step (locate_step, locate_forward)
    watch.py     per-module NaN/Inf checks of forward outputs and backward gradients
    skips.py     the skipped-step report (console line, CSV) the framework wings share
    inject.py    a non-finite input on a chosen training forward, for demos and tests

Imports run one way: this package uses the ops layer (nanops.ops, nanops.clip), never the
framework wings (nanops.yolov5, nanops.ultralytics) or nanops.tools.
"""
from .divergence import DivergenceLimits, DivergenceWatch, Diverged
from .guard import Guard, StepResult, guarded_step
from .locate import RngState, locate_forward, locate_step
from .scaler import GradScaler
from .promote import promote
from .snapshot import NormBufferSnapshot
from .watch import Finding, Watch, watch
from .window import MicroBatchWindow

__all__ = [
    "DivergenceLimits",
    "DivergenceWatch",
    "Diverged",
    "Finding",
    "MicroBatchWindow",
    "GradScaler",
    "Guard",
    "NormBufferSnapshot",
    "RngState",
    "StepResult",
    "Watch",
    "guarded_step",
    "locate_forward",
    "locate_step",
    "promote",
    "watch",
]
