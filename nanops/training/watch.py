"""Locating the first module whose forward output or backward gradient went non-finite.

The NaN guides say "print isnan after every layer"; that syncs the host once per module. Here
every module's outputs (and, in backward, the gradients flowing into them) are collected and
checked with the fused nonfinite_counts op, the counts kept on the device; `check()` reads them
with one host sync per step. Two ways to launch it:
  * per module, as each module finishes (CPU tensors by default): the output is still in cache.
    Measured on a 2-core CPU, collecting instead made the yolov5s-transformer step slower
    (+21% vs +9%): the one late pass reads every activation back from memory.
  * deferred (CUDA tensors by default): the step's tensors are collected and checked together in
    one launch per step, saving a launch per module; they are references, most of them held by
    autograd anyway, and past `max_deferred_bytes` the pending ones are checked early, so memory
    stays bounded. A module output that a later op changes in place is then checked as it is at
    the end of the step (an in-place activation keeps NaN/Inf non-finite).

The hooks are process-wide module hooks filtered by module identity, never stored on the
model: a watched model deep-copies and pickles (torch.save, yolov5/ultralytics checkpoints)
exactly as an unwatched one.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from .._torch_private import pytree
from .global_hooks import forward_hook, forward_pre_hook

# Pending per-module counts kept on the device before they are read (about 100 steps of a
# 200-module model); past that they are folded with one host sync.
MAX_PENDING_RECORDS = 40_000
# Bytes of module outputs and gradients held for the one per-step check before they are checked
# early (a yolov5s-transformer step at 2x3x256x256 collects about 130 MB).
MAX_DEFERRED_BYTES = 512 << 20


@dataclass
class Finding:
    module: str   # qualified name ("" for the root)
    phase: str    # "forward" (module output) or "backward" (gradient w.r.t. the module output)
    step: int
    nan: int
    pos_inf: int
    neg_inf: int
    rank: int | None = None  # under torch.distributed: the rank whose replay found it

    @classmethod
    def replay_failed(cls, err: BaseException) -> Finding:
        """The finding of a replay whose closure raised: the error, in place of a module."""
        return cls(f"{type(err).__name__}: {err}", "replay failed", 0, 0, 0, 0)

    def where(self) -> str:
        """Where it went non-finite, the phrase every report uses: "forward of model.0.conv",
        "backward of model.8.cv3.bn" (the gradient flowing into that module's output), "loss (...)"
        or, for a replay that raised, "unknown: the replay raised ..."."""
        if self.phase == "loss":
            return "loss (every module's forward output was finite)"
        if self.phase == "replay failed":
            return f"unknown: the replay raised {self.module}"
        return f"{self.phase} of {self.module or '<root>'}"

    def __str__(self) -> str:
        on = f" on rank {self.rank}" if self.rank is not None else ""
        if self.phase == "replay failed":
            return f"step {self.step}{on}: {self.where()}"
        return (f"step {self.step}{on}: {self.where()} went non-finite "
                f"(NaN={self.nan}, +Inf={self.pos_inf}, -Inf={self.neg_inf})")


def _tensors(value) -> list[torch.Tensor]:
    """Floating tensors anywhere in a module output: any pytree torch can flatten (lists, tuples,
    dicts, namedtuples, registered classes) and dataclasses."""
    out = []
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            if leaf.dtype.is_floating_point:
                out.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            out.extend(_tensors([getattr(leaf, f.name) for f in dataclasses.fields(leaf)]))
    return out


class Watch:
    """Hooks on every module of `model`; use as a context manager or call `remove()`.

        with nanops.watch(model) as w:
            loss = model(x).sum(); loss.backward()
            finding = w.check()   # None, or the first non-finite module of this step
    """

    def __init__(self, model: nn.Module, *, backward: bool = True, defer: bool | None = None,
                 max_deferred_bytes: int = MAX_DEFERRED_BYTES):
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch: model must be a torch.nn.Module, got {type(model).__name__}")
        if max_deferred_bytes < 0:
            raise ValueError(f"watch: max_deferred_bytes must be >= 0, got {max_deferred_bytes}")
        self.step = 0
        self.first: Finding | None = None
        self._backward = backward
        self._defer = defer
        self._max_deferred_bytes = max_deferred_bytes
        self._records: list[tuple[str, str, torch.Tensor]] = []
        # Collected, not yet checked: (name, phase, tensors), in the order the step met them.
        self._deferred: list[tuple[str, str, list[torch.Tensor]]] = []
        self._deferred_bytes = 0
        self._pending: Finding | None = None  # the first finding of records folded before check()
        # The outputs of the module that finished last: a container returning its last child's
        # tensors (Sequential, C3, ...) is neither scanned nor hooked a second time.
        self._last_outputs: list[torch.Tensor] = []
        self._names = {id(module): name for name, module in model.named_modules()}
        self._model = model  # keeps the ids above from being reused while watched
        self._handles = [forward_hook(self._forward_hook), forward_pre_hook(self._forward_pre_hook)]
        self._one_shot: dict[int, object] = {}  # module id -> handle of its pending last-hook

    def _record(self, name: str, phase: str, tensors: list[torch.Tensor]) -> None:
        if not tensors:
            return
        tensors = [t.detach() for t in tensors]
        if not (self._defer if self._defer is not None else tensors[0].is_cuda):
            self._add_counts(name, phase, torch.ops.nanops.nonfinite_counts.default(tensors))
            return
        devices = {t.device for t in tensors}
        if len(devices) > 1:  # one launch per device: split the output, same name and phase
            for device in devices:
                self._record(name, phase, [t for t in tensors if t.device == device])
            return
        self._deferred.append((name, phase, tensors))
        self._deferred_bytes += sum(t.nbytes for t in tensors)
        if self._deferred_bytes > self._max_deferred_bytes:
            self._check_deferred()

    def _add_counts(self, name: str, phase: str, counts: torch.Tensor) -> None:
        self._records.append((name, phase, counts))  # (tensors, 3), summed at check()
        if len(self._records) >= MAX_PENDING_RECORDS:
            self._fold()

    def _check_deferred(self) -> None:
        """One nonfinite_counts launch per device over every collected tensor; the references
        are dropped, the (tensors, 3) counts kept on the device."""
        by_device: dict[torch.device, list[int]] = {}
        for i, (_, _, tensors) in enumerate(self._deferred):
            by_device.setdefault(tensors[0].device, []).append(i)
        counts_of: dict[int, torch.Tensor] = {}
        for indices in by_device.values():
            flat = [t for i in indices for t in self._deferred[i][2]]
            counts = torch.ops.nanops.nonfinite_counts.default(flat)
            for i, part in zip(indices, counts.split([len(self._deferred[i][2]) for i in indices])):
                counts_of[i] = part
        deferred, self._deferred, self._deferred_bytes = self._deferred, [], 0
        for i, (name, phase, _) in enumerate(deferred):
            self._add_counts(name, phase, counts_of[i])

    def _fold(self) -> None:
        """Reads the pending records (one host sync) when check() is not called for a long time,
        keeping only the first non-finite one: memory stays bounded."""
        finding = self._first_bad()
        if finding is not None and self._pending is None:
            self._pending = finding
        self._records.clear()

    def _first_bad(self) -> Finding | None:
        if self._deferred:
            self._check_deferred()
        if not self._records:
            return None
        flat = torch.cat([c for _, _, c in self._records]).cpu()  # the one host sync
        sizes = [c.shape[0] for _, _, c in self._records]
        counts = torch.stack([part.sum(0) for part in flat.split(sizes)])
        bad = (counts.sum(1) > 0).nonzero()
        if not len(bad):
            return None
        i = int(bad[0])
        name, phase, _ = self._records[i]
        return Finding(name, phase, self.step, *(int(v) for v in counts[i]))

    def _forward_pre_hook(self, module, inputs) -> None:
        # A module with forward hooks of its own returns what its last hook returns, and the
        # process-wide hook below runs before those: for such a module the output is checked by
        # a hook added after its own, for this call only (removed as it runs, even on an error),
        # so nothing is left on the model between calls (deepcopy and pickle stay as unwatched).
        if module._forward_hooks and id(module) in self._names and id(module) not in self._one_shot:
            self._one_shot[id(module)] = module.register_forward_hook(self._final_output_hook, always_call=True)

    def _final_output_hook(self, module, inputs, output) -> None:
        handle = self._one_shot.pop(id(module), None)
        if handle is not None:
            handle.remove()
        self._check_output(module, output)

    def _forward_hook(self, module, inputs, output) -> None:
        if id(module) in self._one_shot:
            return  # checked after the module's own hooks, by _final_output_hook
        self._check_output(module, output)

    def _check_output(self, module, output) -> None:
        name = self._names.get(id(module))
        if name is None:
            return  # a module of another model
        if output is None:
            return
        tensors = [output] if type(output) is torch.Tensor and output.is_floating_point() else _tensors(output)
        if len(tensors) == len(self._last_outputs) and all(a is b for a, b in zip(tensors, self._last_outputs)):
            return  # same tensors as the child that just finished: already checked and hooked
        self._last_outputs = tensors
        self._record(name, "forward", tensors)
        if self._backward and torch.is_grad_enabled():
            for t in tensors:
                if t.requires_grad:
                    t.register_hook(lambda grad, name=name: self._record(name, "backward", [grad]))

    def check(self) -> Finding | None:
        """The first non-finite record since the last check (one host sync), then a new step."""
        finding = self._pending if self._pending is not None else self._first_bad()
        if finding is not None and self.first is None:
            self.first = finding
        self._pending = None
        self._records.clear()
        self._deferred, self._deferred_bytes = [], 0
        self._last_outputs = []
        self.step += 1
        return finding

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for h in self._one_shot.values():
            h.remove()
        self._one_shot.clear()
        self._records.clear()
        self._deferred, self._deferred_bytes = [], 0
        self._last_outputs = []
        self._names = {}
        self._model = None

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def watch(model: nn.Module, *, backward: bool = True, defer: bool | None = None,
          max_deferred_bytes: int = MAX_DEFERRED_BYTES) -> Watch:
    """Starts watching `model`'s forward outputs (and backward gradients) for NaN/Inf.

    Args:
        backward: also check the gradient flowing into every module's output.
        defer: True collects the step's tensors and checks them in one launch (at `check()`, or
            when they pass `max_deferred_bytes`); False checks each module as it finishes; None
            (default) defers CUDA tensors and checks CPU tensors as they come.
    """
    return Watch(model, backward=backward, defer=defer, max_deferred_bytes=max_deferred_bytes)
