"""How close each module's float16 forward is to overflow, seen while training is still healthy.

Under float16 autocast a module's output overflows at 65504, float16's largest finite value;
yolov5's TransformerLayer (no LayerNorm, two stacked projections per side) grows its attention
logits with the fourth power of the weights' scale, so a run trains for epochs and then goes NaN
within a few steps. `HeadroomMonitor` keeps, per module, the largest magnitude its float16
output reached (and per attention, the largest |q·k|/√d, computed in float32 even where nanops'
fused attention never forms the logits), as a running max on the device:

  * every `every`-th step is sampled: its forwards' hooks are installed at the batch's start and
    removed at its optimizer step (the other steps run no hook at all); each hooked output costs
    one aminmax kernel, merged once per step by a scatter on the device (no host sync);
  * a skipped step's values are dropped (a corrupt batch is not the model's headroom);
  * `read()`, at the points nanops already syncs (an epoch's end, `check_every`), copies the
    maxima to the host once, starts a new period and returns the modules within `warn_within`
    of overflow, tightest first, each with its growth per period and the periods left at that
    rate.

Inside a yolov5-style TransformerLayer (attributes q, k, v, ma, fc1, fc2) only the layer is
hooked: hooks on its children would make nanops run it module by module instead of folded.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._torch_private import is_compiled
from ..patching import FoldedTransformerLayer, is_yolo_transformer_layer

HEADROOM_POLICIES = ("warn", "promote", "stop", "off")
FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # 65504
HEADROOM_CSV = "nanops_headroom.csv"
_LOGITS_PER_CHUNK = 1 << 25  # float32 logits formed at once (128 MB) when measuring an attention


@dataclass
class Headroom:
    """One watched value at one read.

    name: the module (an attention's logits: "<attention> q·k"); fraction: its largest |value|
    over float16's 65504 (>= 1: it overflowed float16); growth: the factor it grew by since the
    previous read (None at the first); period, unit: how long a read period was (1 "epoch",
    100 "step"); cure: the module to run in float32 to take it out of float16."""

    name: str
    fraction: float
    growth: float | None
    period: int
    unit: str
    cure: str

    @property
    def periods_left(self) -> float | None:
        """Read periods until it reaches 65504 at its current growth (None: not growing)."""
        if self.fraction >= 1.0:
            return 0.0
        if self.growth is None or self.growth <= 1.0 or self.fraction <= 0.0:
            return None
        return math.log(1.0 / self.fraction) / math.log(self.growth)

    @property
    def imminent(self) -> bool:
        """Within a factor 2 of 65504, or expected to reach it within the next read period: what
        the "promote" and "stop" policies act on."""
        left = self.periods_left
        return self.fraction >= 0.5 or (left is not None and left <= 1.0)

    def _units(self, n: int) -> str:
        return f"{n} {self.unit}{'s' if n != 1 else ''}"

    def __str__(self) -> str:
        if self.fraction >= 1.0:
            return f"{self.name} reached float16's range (|x| up to {self.fraction * FLOAT16_MAX:.4g} > 65504)"
        text = f"{self.name} at 1/{1.0 / self.fraction:.3g} of float16's range"
        if self.growth is not None:
            text += f", x{self.growth:.2g} per {self.unit if self.period == 1 else self._units(self.period)}"
            left = self.periods_left
            if left is not None:
                text += f": overflow expected in ~{self._units(max(1, math.ceil(left * self.period)))}"
        return text


def _is_transformer_layer(module: nn.Module) -> bool:
    """yolov5's (or ultralytics') TransformerLayer, as nanops.patch recognises it, patched or not:
    the math the q·k figure assumes (ma(q(x), k(x), v(x)))."""
    return isinstance(module, FoldedTransformerLayer) or is_yolo_transformer_layer(module)


def _first_tensor(output) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def _float16_compute(t: torch.Tensor) -> bool:
    """Whether `t`'s math runs in float16: it is float16, or float16 autocast is on for its device."""
    if t.dtype == torch.float16:
        return True
    device = t.device.type
    return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16


def _projected(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float())


def _attention_logits_max(ma: nn.MultiheadAttention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """max |q·k|/√d over every head of `ma`, given its projected queries and keys in float32,
    sequence first ((L, N, E) or (L, E)) or batch first as `ma` says; chunked over batch x heads."""
    if q.dim() == 2:
        q, k = q.unsqueeze(1), k.unsqueeze(1)
    elif getattr(ma, "batch_first", False):
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    head_dim = q.shape[-1] // ma.num_heads
    q = q.reshape(q.shape[0], -1, head_dim).transpose(0, 1)  # (N * heads, L, head_dim)
    k = k.reshape(k.shape[0], -1, head_dim).transpose(0, 1)
    per = max(1, _LOGITS_PER_CHUNK // max(1, q.shape[1] * k.shape[1]))
    best = q.new_zeros(())
    for start in range(0, q.shape[0], per):
        logits = torch.bmm(q[start:start + per], k[start:start + per].transpose(1, 2))
        best = torch.maximum(best, logits.abs().amax() if logits.numel() else best)
    return best / math.sqrt(head_dim)


def _in_projections(ma: nn.MultiheadAttention):
    if ma._qkv_same_embed_dim:
        wq, wk, _ = ma.in_proj_weight.chunk(3)
    else:
        wq, wk = ma.q_proj_weight, ma.k_proj_weight
    bq, bk = ma.in_proj_bias.chunk(3)[:2] if ma.in_proj_bias is not None else (None, None)
    return (wq, bq), (wk, bk)


class HeadroomMonitor:
    """Per-module float16 headroom of one model's training forwards (see the module docstring).

        monitor = HeadroomMonitor(model, every=10)
        for batch in loader:
            monitor.begin()                    # hooks in place when this step is sampled
            ... forward (under float16 autocast), backward ...
            monitor.stepped(found_inf)         # this step's maxima kept, or dropped if skipped
        tight = monitor.read("epoch")          # one host copy; [Headroom], tightest first

    Args:
        model: the trained module (unwrapped).
        every: sample one step in `every` (1: every step).
        warn_within: `read()` returns the values within this factor of 65504.
        compiled: whether the model runs through torch.compile (default: looked for in `model`).
    """

    def __init__(self, model: nn.Module, *, every: int = 10, warn_within: float = 8.0,
                 compiled: bool | None = None) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"HeadroomMonitor: every must be a positive int, got {every!r}")
        if not warn_within >= 1.0:
            raise ValueError(f"HeadroomMonitor: warn_within must be >= 1, got {warn_within!r}")
        self.model, self.every, self.warn_within = model, every, warn_within
        # Hooks would recompile it: nothing is watched (`compiled`: the caller knows of a wrapper).
        self.compiled = is_compiled(model) if compiled is None else compiled
        self.names: list[str] = []   # what each slot holds
        self.cures: list[str] = []   # the module to promote for it
        self._watched: list[tuple[int, nn.Module, int | None]] = []  # (output slot, module, logits slot)
        for name, module in self._modules():
            slot = self._slot(name, name)
            logits = None
            if isinstance(module, nn.MultiheadAttention):
                logits = self._slot(f"{name} q·k", name)
            elif _is_transformer_layer(module):
                logits = self._slot(f"{name}.ma q·k", name)
            self._watched.append((slot, module, logits))
        self._running: torch.Tensor | None = None  # (slots,) float32 on the device: max since the last read
        self._idx: list[int] = []
        self._lo: list[torch.Tensor] = []
        self._hi: list[torch.Tensor] = []
        self._idx_device: tuple[tuple[int, ...], torch.Tensor] | None = None
        self._last: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (output, lo, hi)
        self._handles: list = []
        self._steps = 0            # optimizer steps seen
        self._steps_at_read = 0
        self._sampled = False      # a kept sampled step since the last read
        self.history: list[tuple[str, int, list[float]]] = []  # (period, step, fraction per slot)
        self._written = 0  # reads in history already in the CSV
        self.latest: list[Headroom] = []  # every value the latest read saw in float16, tightest first
        self._previous: list[float] | None = None

    def _slot(self, name: str, cure: str) -> int:
        self.names.append(name)
        self.cures.append(cure)
        return len(self.names) - 1

    def _modules(self):
        """Every module but the model itself, a transformer layer's children left out, and a
        module shared by several parents (yolov5's one SiLU for every Conv) left to them: its
        one name would stand for all its uses."""
        inside: list[str] = []
        uses: dict[int, int] = {}
        for _, module in self.model.named_modules(remove_duplicate=False):
            uses[id(module)] = uses.get(id(module), 0) + 1
        for name, module in self.model.named_modules():
            if not name or uses[id(module)] > 1 or any(name.startswith(p + ".") for p in inside):
                continue
            if _is_transformer_layer(module):
                inside.append(name)
            yield name, module

    # --- a step -----------------------------------------------------------------------------
    @property
    def sampling(self) -> bool:
        return bool(self._handles)

    def begin(self) -> None:
        """A batch starts: when the coming optimizer step is sampled, the hooks go in (once)."""
        if self.compiled or self._handles or self._steps % self.every:
            return
        for slot, module, logits in self._watched:
            self._handles.append(module.register_forward_hook(self._hook(slot, module, logits), with_kwargs=True))

    def _hook(self, slot: int, module: nn.Module, logits: int | None):
        def record(mod, args, kwargs, output):
            if not (mod.training and torch.is_grad_enabled()):
                return  # validation, or a replay's no-grad forward
            out = _first_tensor(output)
            if out is not None and out.dtype == torch.float16 and out.numel():
                if self._last is not None and self._last[0] is out:  # a parent returning its child's output
                    lo, hi = self._last[1], self._last[2]
                else:
                    lo, hi = torch.aminmax(out.detach())
                    self._last = (out, lo, hi)
                self._add(slot, lo, hi)
            if logits is not None:
                best = self._logits(module, args, kwargs)
                if best is not None:
                    self._add(logits, best, best)
        return record

    def _logits(self, module: nn.Module, args, kwargs) -> torch.Tensor | None:
        with torch.no_grad():
            if isinstance(module, nn.MultiheadAttention):
                query = args[0] if args else kwargs.get("query")
                key = args[1] if len(args) > 1 else kwargs.get("key")
                if not isinstance(query, torch.Tensor) or not _float16_compute(query):
                    return None
                (wq, bq), (wk, bk) = _in_projections(module)
                with torch.autocast(query.device.type, enabled=False):
                    return _attention_logits_max(module, _projected(query, wq, bq), _projected(key, wk, bk))
            x = args[0] if args else kwargs.get("x")
            if not isinstance(x, torch.Tensor) or not _float16_compute(x):
                return None
            (wq, bq), (wk, bk) = _in_projections(module.ma)
            with torch.autocast(x.device.type, enabled=False):
                q = _projected(_projected(x, module.q.weight, module.q.bias), wq, bq)
                k = _projected(_projected(x, module.k.weight, module.k.bias), wk, bk)
                return _attention_logits_max(module.ma, q, k)

    def _add(self, slot: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self._idx.append(slot)
        self._lo.append(lo)
        self._hi.append(hi)

    def stepped(self, found_inf: torch.Tensor | None = None, skipped: bool | None = None) -> None:
        """The optimizer step was taken or skipped: a sampled step's hooks go, and its maxima join
        the running ones unless it was skipped (`skipped` when known on the host, else
        `found_inf`, a device tensor: decided there, no sync)."""
        self._steps += 1
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last = None
        if not self._idx:
            return
        idx, lo, hi = self._idx, self._lo, self._hi
        self._idx, self._lo, self._hi = [], [], []
        if skipped:
            return
        device = hi[0].device
        values = torch.fmax(-torch.stack(lo).float(), torch.stack(hi).float())  # fmax: a NaN loses
        values = torch.nan_to_num(values, nan=0.0, posinf=math.inf)
        step = torch.zeros(len(self.names), device=device).scatter_reduce_(0, self._index(idx, device), values,
                                                                           "amax")
        if self._running is None:
            self._running = torch.zeros_like(step)
        merged = torch.maximum(self._running, step)
        if skipped is None and found_inf is not None:
            merged = torch.where(found_inf.to(device).reshape(-1)[0] != 0, self._running, merged)
        self._running = merged
        self._sampled = True

    def _index(self, idx: list[int], device: torch.device) -> torch.Tensor:
        key = tuple(idx)  # the same hooks fire in the same order each sampled step: made once
        if self._idx_device is None or self._idx_device[0] != key or self._idx_device[1].device != device:
            self._idx_device = (key, torch.tensor(idx, device=device))
        return self._idx_device[1]

    # --- a read -----------------------------------------------------------------------------
    def read(self, unit: str = "step", *, label: str | None = None,
             save_dir: Path | str | None = None) -> list[Headroom]:
        """The period since the last read closes (one host copy): the values within `warn_within`
        of 65504, tightest first, with their growth since the previous read (every value seen:
        `latest`). `unit`: "step" (a period is the steps since the last read) or a unit one read
        spans once ("epoch"); `label`: the period's name in `history` and the CSV (default
        "step N"); `save_dir`: the read's figures added to its nanops_headroom.csv. Empty when
        no step was sampled since the last read."""
        steps = self._steps - self._steps_at_read
        if not self._sampled or steps == 0:
            return []
        self._sampled = False
        self._steps_at_read = self._steps
        fractions = [v / FLOAT16_MAX for v in self._running.tolist()]
        self._running.zero_()
        period = steps if unit == "step" else 1
        self.history.append((label or f"step {self._steps}", self._steps, fractions))
        previous, self._previous = self._previous, fractions
        seen = []
        for i, fraction in enumerate(fractions):
            if fraction <= 0.0:
                continue  # not computed in float16 this period
            growth = None
            if previous is not None and previous[i] > 0.0 and math.isfinite(fraction):
                growth = fraction / previous[i]
            seen.append(Headroom(self.names[i], fraction, growth, period, unit, self.cures[i]))
        self.latest = sorted(seen, key=lambda h: -h.fraction)
        if save_dir is not None:
            self._write_csv(Path(save_dir))
        return [h for h in self.latest if h.fraction * self.warn_within >= 1.0]

    def _write_csv(self, save_dir: Path) -> None:
        """The reads not yet written, one row per watched value that ran in float16, added to
        `<save_dir>/nanops_headroom.csv` (which this monitor's first write starts afresh)."""
        path = save_dir / HEADROOM_CSV
        path.parent.mkdir(parents=True, exist_ok=True)
        first = self._written == 0
        with path.open("w" if first else "a", newline="") as f:
            writer = csv.writer(f)
            if first:
                writer.writerow(["period", "step", "module", "max_abs", "fraction_of_float16_max"])
            for label, step, fractions in self.history[self._written:]:
                for name, fraction in zip(self.names, fractions):
                    if fraction > 0.0:
                        writer.writerow([label, step, name, f"{fraction * FLOAT16_MAX:.6g}", f"{fraction:.6g}"])
        self._written = len(self.history)

    def remove(self) -> None:
        """Takes every hook off (the monitor is done)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._idx, self._lo, self._hi, self._last = [], [], [], None
