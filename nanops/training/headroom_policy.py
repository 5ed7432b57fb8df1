"""What a protected run does with its float16 headroom (nanops.training.headroom): the monitor made
at an AMP run's first batch, read at each of the Session's checks, reported on the main rank, and
acted on by policy: "warn", "promote" (the module run in float32 before it overflows: the cure
of a float16 overflow, applied ahead), "stop" (nanops.Diverged with the diagnosis) or "off"."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .._torch_private import is_compiled
from .divergence import Diverged
from .headroom import HEADROOM_POLICIES, Headroom, HeadroomMonitor

if TYPE_CHECKING:
    from .session import Session


def headroom_message(tight: list[Headroom], shown: int = 3) -> str:
    """One line on the values nearest float16's limit (tightest first)."""
    text = "nanops: float16 headroom: " + "; ".join(str(h) for h in tight[:shown])
    if len(tight) > shown:
        text += f" (and {len(tight) - shown} more)"
    return text + (". A module this close overflows float16 soon: lower the lr or warmup, check its init, add a "
                   "normalisation, or run it in float32 (on_headroom='promote').")


class HeadroomPolicy:
    """A Session's headroom monitor and its policy (see the module docstring)."""

    def __init__(self, policy: str, every: int, what: str) -> None:
        if policy not in HEADROOM_POLICIES:
            raise ValueError(f"{what}: on_headroom must be one of {', '.join(HEADROOM_POLICIES)}, got {policy!r}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"{what}: headroom_every must be a positive int, got {every!r}")
        self.policy, self.every = policy, every
        self.monitor: HeadroomMonitor | None = None
        self.notes: list[str] = []  # the reports given

    def begin(self, session: Session) -> None:
        """An AMP batch starts: the monitor made for the session's model (once), its hooks in
        place when the coming step is sampled."""
        if self.policy == "off":
            return
        if self.monitor is None:
            self.monitor = HeadroomMonitor(session.module, every=self.every, compiled=is_compiled(session.model))
            if self.monitor.compiled and session.main_rank:
                session._warn("nanops: the float16 headroom monitor is off for this model: it runs through "
                              "torch.compile, and hooks added per sampled step would recompile it")
        self.monitor.begin()

    def stepped(self, found_inf: torch.Tensor, skipped: bool | None) -> None:
        if self.monitor is not None:
            self.monitor.stepped(found_inf, skipped)

    def drop(self) -> None:
        """The monitor's hooks off, the monitor forgotten (a new model, the run's end)."""
        if self.monitor is not None:
            self.monitor.remove()
        self.monitor = None

    def read(self, session: Session, unit: str, label: str | None, save_dir: Path | str | None,
             collective: bool) -> None:
        """A read period closes (HeadroomMonitor.read): figures to save_dir's CSV on the main
        rank, the tight values said, the imminent ones promoted or stopped on. collective: every
        rank reads here (the promotions agreed, so that the replicas compute alike)."""
        monitor = self.monitor
        if monitor is None:
            return
        tight = monitor.read(unit, label=label, save_dir=save_dir if session.main_rank else None)
        act = self.policy in ("promote", "stop")
        urgent = [h.cure for h in tight if h.imminent] if act else []
        if act and collective and session.world_size > 1:
            urgent = list(dict.fromkeys(c for rank in session.on_every_rank(urgent) for c in rank))
        if not tight and not urgent:
            return
        text = headroom_message(tight)
        if urgent and self.policy == "stop":
            self.notes.append(text)
            note = session.stop_note() if callable(session.stop_note) else session.stop_note
            raise Diverged(f"{text} Stopping (on_headroom='stop').{note}")
        if urgent and (collective or session.world_size == 1):
            now = session.promote(urgent)
            if now:
                text += f" Run in float32 from now on, ahead of an overflow: {', '.join(now)}."
        self.notes.append(text)
        if session.main_rank:
            session._warn(text)
