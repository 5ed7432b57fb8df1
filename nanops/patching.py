"""Switching nanops' attention into any built model, and back.

`patch` changes the class of every torch.nn.MultiheadAttention in a model (and of every subclass
of it whose forward is torch's, such as RT-DETR variants that only add attributes) to a patched
class in place: the module object, its Parameters (so optimizers, EMA copies and DDP built
earlier keep working), device, dtype, mode and hooks stay as they are. A patched module pickles
as the class it was built as, so checkpoints saved during a protected run (torch.save of the
model, yolov5's and ultralytics' last.pt) load where nanops is not installed; copy.deepcopy keeps
it patched (EMA copies stay protected).

TorchScript cannot compile nanops' attention: scripting a patched model stops with one line
saying to unpatch it first (the scripted model then runs torch's attention) or to trace/export
it, which keeps the stable softmax as standard ops; `patch` refuses a ScriptModule.
"""
from __future__ import annotations

import ast
import copy
import copyreg
import inspect
import textwrap
import warnings

import torch
from torch import nn

from .nn import MultiheadAttention
from .transformer_layer import transformer_layer


class PicklesAsOriginal:
    """A module switched to a nanops class in place (patched attention, a float32 promotion),
    saved as the class it was built as; a deepcopy keeps the switch."""

    _original_class: type[nn.Module]

    def __reduce_ex__(self, protocol):
        # Saved as the class it was built as, so the file needs torch only. (copyreg.__newobj__
        # must name the object's own class; the older reconstructor may name another.)
        return copyreg._reconstructor, (self._original_class, object, None), dict(self.__dict__)

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
        return new


class PatchedMultiheadAttention(PicklesAsOriginal, MultiheadAttention):
    """A torch.nn.MultiheadAttention switched to nanops' forward by `patch`."""

    _original_class: type[nn.MultiheadAttention] = nn.MultiheadAttention

    def __prepare_scriptable__(self):
        raise RuntimeError(
            "torch.jit.script: nanops' stable attention cannot be scripted. Call nanops.unpatch(model) first (the "
            "scripted model then runs torch's attention), or export with torch.jit.trace / torch.export / ONNX, "
            "which keep the stable softmax as standard ops.")


class PatchedWeightlessAttention(PatchedMultiheadAttention):
    """A patched attention whose caller is known to discard the attention weights (yolov5's and
    ultralytics' TransformerLayer, RT-DETR's encoder layers: `self.ma(...)[0]`): need_weights is
    taken as False, so the attention is fused and no (L, S) matrix is formed; the weights come
    back as None."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        return super().forward(query, key, value, key_padding_mask, False, attn_mask, average_attn_weights,
                               is_causal)


_PATCHED_CLASSES: dict[tuple[type, bool], type] = {
    (nn.MultiheadAttention, False): PatchedMultiheadAttention,
    (nn.MultiheadAttention, True): PatchedWeightlessAttention,
}


def _patched_class(cls: type[nn.MultiheadAttention], weights_unused: bool) -> type[nn.MultiheadAttention]:
    """The patched class for `cls`: nanops' forward first in the MRO, everything else of cls kept."""
    key = (cls, weights_unused)
    if key not in _PATCHED_CLASSES:
        base = PatchedWeightlessAttention if weights_unused else PatchedMultiheadAttention
        _PATCHED_CLASSES[key] = type(f"Patched{cls.__name__}", (base, cls),
                                     {"_original_class": cls, "__module__": __name__})
    return _PATCHED_CLASSES[key]


_DISCARDS: dict[tuple[type, str], bool] = {}


def _indexes_zero(node: ast.AST) -> bool:
    index = node.slice
    return isinstance(index, ast.Constant) and index.value == 0


def discards_weights(owner: type[nn.Module], attr: str) -> bool:
    """Whether every use of `self.<attr>` in the methods of `owner` (and of its bases below
    nn.Module) is a call whose result is indexed [0] at once, as in yolov5's TransformerLayer:
    `self.ma(q, k, v)[0]`. Read from the source, once per class; False where it cannot be read."""
    key = (owner, attr)
    if key in _DISCARDS:
        return _DISCARDS[key]
    calls_indexed = other_uses = 0
    for cls in owner.__mro__:
        if cls in (nn.Module, object) or cls.__module__.startswith("torch."):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError, SyntaxError):
            _DISCARDS[key] = False
            return False
        indexed_calls = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Call) and _indexes_zero(node):
                indexed_calls.add(id(node.value.func))
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name)
                    and node.value.id == "self" and isinstance(node.ctx, ast.Load)):  # not `self.ma = ...`
                if id(node) in indexed_calls:
                    calls_indexed += 1
                else:
                    other_uses += 1
    _DISCARDS[key] = calls_indexed > 0 and other_uses == 0
    return _DISCARDS[key]


class FoldedTransformerLayer(PicklesAsOriginal, nn.Module):
    """A yolov5 (or ultralytics) TransformerLayer switched by `patch` to nanops.transformer_layer:
    the same parameters and attributes, its stacked projections folded, its attention fused."""

    def forward(self, x):
        return transformer_layer(self, x)


def _body_dump(source: str) -> str:
    function = ast.parse(textwrap.dedent(source)).body[0]
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return "\n".join(ast.dump(node) for node in body)


# yolov5's and ultralytics' TransformerLayer.forward bodies, exactly: only a layer computing this
# is switched to the folded forward.
_YOLO_LAYER_BODIES = {
    _body_dump("""
        def forward(self, x):
            x = self.ma(self.q(x), self.k(x), self.v(x))[0] + x
            x = self.fc2(self.fc1(x)) + x
            return x
    """),
    _body_dump("""
        def forward(self, x):
            x = self.ma(self.q(x), self.k(x), self.v(x))[0] + x
            return self.fc2(self.fc1(x)) + x
    """),
}
_LAYER_VERDICT: dict[type, bool] = {}


def is_yolo_transformer_layer(module: nn.Module) -> bool:
    """A module whose class computes yolov5's TransformerLayer forward (read from its source once)."""
    cls = type(module)
    if cls not in _LAYER_VERDICT:
        try:
            _LAYER_VERDICT[cls] = _body_dump(inspect.getsource(cls.forward)) in _YOLO_LAYER_BODIES
        except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
            _LAYER_VERDICT[cls] = False
    return _LAYER_VERDICT[cls] and all(hasattr(module, name) for name in ("q", "k", "v", "ma", "fc1", "fc2"))


_LAYER_CLASSES: dict[type, type] = {}


def _patched_layer_class(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in _LAYER_CLASSES:
        _LAYER_CLASSES[cls] = type(f"Patched{cls.__name__}", (FoldedTransformerLayer, cls),
                                   {"_original_class": cls, "__module__": __name__})
    return _LAYER_CLASSES[cls]


def _weights_unused(model: nn.Module) -> set[int]:
    """ids of the attention modules of `model` whose every parent discards their weights."""
    verdict: dict[int, bool] = {}
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.MultiheadAttention):
                unused = discards_weights(type(parent), name)
                verdict[id(child)] = verdict.get(id(child), True) and unused
    return {key for key, unused in verdict.items() if unused}


def _patchable(module: nn.Module) -> bool:
    cls = type(module)
    return (isinstance(module, nn.MultiheadAttention) and not isinstance(module, MultiheadAttention)
            and cls.forward is nn.MultiheadAttention.forward)


def patch(model: nn.Module) -> int:
    """Switches every torch.nn.MultiheadAttention in `model` (the model itself included) to
    nanops' stable attention, in place; returns how many were switched.

    Subclasses of nn.MultiheadAttention are switched when their forward is torch's (their other
    methods and attributes stay); those with a forward of their own are left alone, with one
    warning naming them. An attention whose parent module only ever keeps `[0]` of its result
    (yolov5's TransformerLayer) runs fused: need_weights is taken as False and no (L, S) matrix
    is formed (see PatchedWeightlessAttention); yolov5's and ultralytics' TransformerLayer itself
    runs nanops.transformer_layer (stacked projections folded). Idempotent. Undo with `unpatch` (saved checkpoints need no undo:
    patched modules pickle as the class they were built as).
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("nanops.patch: got a torch.jit.ScriptModule, whose code is compiled and cannot be patched; "
                        "patch the eager model (and trace or export it afterwards if needed)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"nanops.patch: model must be a torch.nn.Module, got {type(model).__name__}")
    switched = 0
    own_forward = set()
    weightless = _weights_unused(model)
    for module in model.modules():
        if _patchable(module):
            module.__class__ = _patched_class(type(module), id(module) in weightless)
            switched += 1
        elif not isinstance(module, FoldedTransformerLayer) and is_yolo_transformer_layer(module):
            module.__class__ = _patched_layer_class(type(module))
        elif isinstance(module, nn.MultiheadAttention) and not isinstance(module, MultiheadAttention):
            own_forward.add(type(module).__qualname__)
    if own_forward:
        warnings.warn(f"nanops.patch: left unpatched the nn.MultiheadAttention subclass(es) {sorted(own_forward)}: "
                      "their forward is their own, not torch's, so nanops cannot stand in for it", stacklevel=2)
    return switched


def unpatch(model: nn.Module) -> int:
    """Reverses `patch`: every patched attention becomes the class it was built as again (for
    exports and checkpoints that must be plain torch); returns how many were switched back."""
    switched = 0
    for module in model.modules():
        if isinstance(module, PatchedMultiheadAttention):
            module.__class__ = module._original_class
            switched += 1
        elif isinstance(module, FoldedTransformerLayer):
            module.__class__ = module._original_class
    return switched
