"""Training protection, over the ops: a non-finite step never reaches weights, optimizer state,
EMA or BatchNorm statistics, and the first non-finite module is named by replaying that step.

    session.py     Session: the engine every loop's protection runs on (window, RNG, replay,
                   promotion, rank agreement, divergence policy, skip record), driven by events
    guard.py       Guard (the Session's face for hand-written loops) and guarded_step
    scaler.py      GradScaler: torch's, plus skips with AMP off and BatchNorm restore
    window.py      gradient-accumulation windows checked micro-batch by micro-batch
    divergence.py  a lost run noticed from the step's own numbers; policies warn/stop/rollback
    promote.py     a module whose float16 forward overflowed runs in float32 from then on
    headroom.py    how close each module's float16 output is to 65504, sampled on the device
    headroom_policy.py  a run's headroom read, reported and acted on (warn, promote, stop)
    snapshot.py    BatchNorm running statistics kept and restored on the device
    locate.py      replay of a skipped step (locate_step, locate_forward)
    watch.py       per-module NaN/Inf checks of forward outputs and backward gradients
    skips.py       SkippedStep (the one record of a skip) and SkipReport (console line, CSV)
    checkpoints.py checkpoint loading that runs no code from the file
    global_hooks.py  the process-wide module hooks, registered in one place

Imports run one way: this package uses the ops layer (nanops.ops, nanops.clip), never the
framework wings (nanops.yolov5, nanops.ultralytics) or nanops.tools. The wings use the names
exported here, nothing private.
"""
from .checkpoints import TRUST_CHECKPOINTS, UntrustedCheckpoint, checkpoint_loading
from .divergence import POLICIES, DivergenceLimits, DivergenceWatch, Diverged
from .global_hooks import forward_hook, forward_pre_hook
from .guard import Guard, StepResult, guarded_step
from .headroom import HEADROOM_CSV, HEADROOM_POLICIES, Headroom, HeadroomMonitor
from .locate import RngState, cuda_devices, locate_forward, locate_step
from .promote import promote
from .scaler import GradScaler
from .session import Session
from .skips import SKIPPED_CSV, SkippedStep, SkipReport
from .snapshot import NormBufferSnapshot
from .watch import Finding, Watch, watch
from .window import MicroBatchWindow

__all__ = [
    "HEADROOM_CSV",
    "HEADROOM_POLICIES",
    "POLICIES",
    "SKIPPED_CSV",
    "TRUST_CHECKPOINTS",
    "DivergenceLimits",
    "DivergenceWatch",
    "Diverged",
    "Finding",
    "GradScaler",
    "Guard",
    "Headroom",
    "HeadroomMonitor",
    "MicroBatchWindow",
    "NormBufferSnapshot",
    "RngState",
    "Session",
    "SkipReport",
    "SkippedStep",
    "StepResult",
    "UntrustedCheckpoint",
    "Watch",
    "checkpoint_loading",
    "cuda_devices",
    "forward_hook",
    "forward_pre_hook",
    "guarded_step",
    "locate_forward",
    "locate_step",
    "promote",
    "watch",
]
