"""Python entry points of the nanops operators: argument checks, fake kernels, autograd.

Every function here calls a ``torch.ops.nanops.*`` operator defined in csrc/ops.cpp.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from . import _distributed
from ._torch_private import onnx_export_flag
from . import _fallback, _loader  # noqa: F401  (_loader: kernels or fallback for every op, chosen once)

TensorOrTensors = torch.Tensor | Iterable[torch.Tensor | None]


def _tensor_list(tensors: TensorOrTensors, name: str = "tensors") -> list[torch.Tensor]:
    """A single tensor or any iterable (generators included) as a list, None entries dropped;
    anything else (numbers, numpy arrays) is a TypeError naming the argument."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if hasattr(tensors, "__array__"):  # numpy arrays iterate into numpy scalars: name the real type
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(tensors).__module__}."
                        f"{type(tensors).__name__} (convert with torch.as_tensor)")
    try:
        items = list(tensors)
    except TypeError:
        raise TypeError(f"{name} must be a tensor or an iterable of tensors, got {type(tensors).__name__}") from None
    out = []
    for i, t in enumerate(items):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
        out.append(t)
    return out


def _check_list(tensors: list[torch.Tensor], what: str) -> torch.device:
    """One device and dense layout for the whole list; returns the device."""
    device = tensors[0].device
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"{what}: all tensors must be on one device; tensors[0] is on {device}, "
                             f"tensors[{i}] is on {t.device}")
        if t.layout != torch.strided:
            # Sparse tensors dispatch to their own backend and would never reach our check.
            raise ValueError(f"{what}: tensors[{i}] has layout {t.layout}; only dense tensors are supported, "
                             "call .to_dense() first")
    return device


# --------------------------------------------------------------------------------------------
# NaN / Inf detection
# --------------------------------------------------------------------------------------------

def _as_list(tensors: TensorOrTensors, name: str) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """The list an op takes as it is: a tensor, list or tuple passes unexamined (the op checks its
    elements in C++, once); other iterables go through _tensor_list."""
    if isinstance(tensors, torch.Tensor):
        return [tensors]
    if type(tensors) is list or type(tensors) is tuple:
        return tensors
    if hasattr(tensors, "__array__"):
        return _tensor_list(tensors, name)  # refuses it, naming the type
    try:
        return list(tensors)  # a generator, say: its None entries kept, so rows can line up
    except TypeError:
        return _tensor_list(tensors, name)


# The tensor types a list op takes as they are; anything else (None, DTensor, other subclasses,
# non-tensors) is examined in Python first. The type test runs in C (issuperset over map): ~8 us
# for yolov5's 182 grads on a 2-core CPU, half what a Python generator over them costs.
_PLAIN_TENSORS = frozenset({torch.Tensor, torch.nn.Parameter})


def _call_list_op(op, tensors: TensorOrTensors, what: str, empty: Callable[[], torch.Tensor],
                  over_shards: Callable | None = None, rows: bool = False) -> torch.Tensor:
    """op(list), the path chosen before the call from the entries' types: a list of plain tensors
    goes to the op as it is, its checks in C++ (a ValueError naming the tensor; a kernel's own
    failure, out of memory or a device fault, reaches the caller unchanged). Any other list is
    examined in Python: None entries are dropped, anything else raises an error naming the
    argument; DTensors (FSDP2 grads) go to `over_shards(op, shards)`, which runs the op on the
    local shards and reduces the result over the mesh. rows: the result has a row per tensor,
    and a None entry gets a row of zeros in its place (the rows line up with the list given)."""
    tensor_list = _as_list(tensors, f"{what}: tensors")
    if not tensor_list:
        return empty()
    if _PLAIN_TENSORS.issuperset(map(type, tensor_list)):
        return op(tensor_list)
    checked = _tensor_list(tensor_list, f"{what}: tensors")
    if rows and len(checked) < len(tensor_list):
        return _rows_in_place(op, tensor_list, checked, what, empty, over_shards)
    if not checked:
        return empty()
    if _distributed.any_sharded(checked):
        shards = _distributed.local_shards(checked, what)
        _check_list(shards.local, what)
        return over_shards(op, shards)
    _check_list(checked, what)
    return op(checked)


def _rows_in_place(op, given: list, present: list[torch.Tensor], what: str, empty, over_shards) -> torch.Tensor:
    """The op's rows for the tensors of `given`, zeros where it holds None."""
    if not present:
        return empty().new_zeros((len(given), 3))
    counts = _call_list_op(op, present, what, empty, over_shards)
    out = counts.new_zeros((len(given), counts.shape[1]))
    where = torch.tensor([i for i, t in enumerate(given) if t is not None], device=counts.device)
    return out.index_copy_(0, where, counts)


def _counts_over_shards(op, shards: _distributed.LocalShards) -> torch.Tensor:
    counts = op(shards.local)
    counted = torch.zeros_like(counts)
    index = torch.tensor(shards.counted_index, dtype=torch.long, device=counts.device)
    counted.index_copy_(0, index, counts.index_select(0, index))  # a replica's rows count once
    return _distributed.sum_over(counted, shards.group)


def _flag_over_shards(op, shards: _distributed.LocalShards) -> torch.Tensor:
    return _distributed.agree(op(shards.local), shards.group)


def _all_finite_over_shards(op, shards: _distributed.LocalShards) -> torch.Tensor:
    nonfinite = (~op(shards.local)).to(torch.float32).reshape(1)
    return _distributed.agree(nonfinite, shards.group).reshape(()) == 0


def nonfinite_counts(tensors: TensorOrTensors) -> torch.Tensor:
    """Counts NaN, +Inf and -Inf in every tensor of a list, in one fused pass.

    Args:
        tensors: a tensor or an iterable of tensors, all on one device; None entries (the .grad
            of a parameter without one) get a row of zeros. float32/float16/bfloat16/float64 are
            scanned; integer and bool tensors hold no NaN or Inf and count as finite (zeros).

    Returns:
        int64 tensor of shape (len(tensors), 3) on the tensors' device, row i for tensors[i]:
        columns are the counts of NaN, +Inf and -Inf. Nothing is copied to the host. DTensors
        (FSDP2 grads) are counted whole: the local shards' counts are summed over the mesh
        (every rank must call it).
    """
    return _call_list_op(torch.ops.nanops.nonfinite_counts.default, tensors, "nonfinite_counts",
                         lambda: torch.zeros(0, 3, dtype=torch.long), _counts_over_shards, rows=True)


def all_finite(tensors: TensorOrTensors) -> torch.Tensor:
    """0-dim bool tensor on the tensors' device: True when no tensor holds a NaN or an Inf (one
    launch on CUDA, no host sync)."""
    return _call_list_op(torch.ops.nanops.all_finite.default, tensors, "all_finite", lambda: torch.tensor(True),
                         _all_finite_over_shards)


def nonfinite_flag(tensors: TensorOrTensors) -> torch.Tensor:
    """float32 tensor of shape (1,) on the tensors' device: 1.0 when some tensor holds a NaN or an
    Inf, else 0.0 (the found_inf GradScaler keeps per device). One launch on CUDA, no host sync."""
    return _call_list_op(torch.ops.nanops.nonfinite_flag.default, tensors, "nonfinite_flag",
                         lambda: torch.zeros(1), _flag_over_shards)


@torch.library.register_fake("nanops::nonfinite_counts")
def _nonfinite_counts_fake(tensors):
    # Shape depends only on the list length, so torch.compile can trace through it.
    torch._check(len(tensors) > 0, lambda: "nonfinite_counts: empty list")
    _fake_check_one_device(tensors, "nonfinite_counts")
    return tensors[0].new_empty((len(tensors), 3), dtype=torch.long)


@torch.library.register_fake("nanops::all_finite")
def _all_finite_fake(tensors):
    torch._check(len(tensors) > 0, lambda: "all_finite: empty list")
    _fake_check_one_device(tensors, "all_finite")
    return tensors[0].new_empty((), dtype=torch.bool)


@torch.library.register_fake("nanops::nonfinite_flag")
def _nonfinite_flag_fake(tensors):
    torch._check(len(tensors) > 0, lambda: "nonfinite_flag: empty list")
    _fake_check_one_device(tensors, "nonfinite_flag")
    return tensors[0].new_empty((1,), dtype=torch.float32)


def _fake_check_device(t, what: str, name: str, device: torch.device) -> None:
    # Runs whenever one argument is a meta (or fake) tensor: a meta mask or found_inf beside real
    # data would otherwise reach this kernel and give uninitialised results instead of an error.
    if t is not None:
        torch._check_value(t.device == device, lambda: f"{what}: {name} is on {t.device} but the data is on {device}")


def _fake_check_one_device(tensors, what: str) -> None:
    # Same contract as the real kernels, so a traced program fails where an eager one would.
    for i, t in enumerate(tensors):
        torch._check_value(t.device == tensors[0].device,
                           lambda: f"{what}: all tensors must be on one device; tensors[{i}] is on {t.device}")


# --------------------------------------------------------------------------------------------
# Stable softmax
# --------------------------------------------------------------------------------------------

def stable_softmax(
    x: torch.Tensor,
    dim: int = -1,
    *,
    scale: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax(scale * x + mask) along ``dim`` that never turns overflow or masking into NaN.

    Args:
        x: logits, float32/float16/bfloat16/float64, any shape and layout. 16-bit inputs are
            accumulated in float32; the result has x's dtype and shape (contiguous).
        dim: the softmax dimension.
        scale: multiplies x before the mask is applied (e.g. 1/sqrt(head_dim)).
        mask: optional, broadcastable to x. bool: True marks the positions that take part
            (as in scaled_dot_product_attention); floating: added to the scaled logits in the
            accumulation dtype (a float32 -1e9 mask keeps its meaning on float16 logits; a
            mask in x's own 16-bit dtype is read in place, no converted copy per call).

    Semantics beyond torch.softmax:
        * a row where no position takes part (all masked, or all -inf) gives zeros and a zero
          gradient instead of NaN;
        * a row holding +inf logits gives each +inf position an equal share (1/count) and every
          other position 0, instead of NaN;
        * a NaN in a row's logits still makes that row NaN: broken inputs are not hidden.
        The backward uses the usual formula on the returned probabilities, scale included.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"stable_softmax: x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(scale, torch.Tensor) and scale.requires_grad:
        raise ValueError("stable_softmax: scale is a tensor that requires grad, but scale is a constant of the op "
                         "(its gradient would be dropped); fold a learned scale into x instead")
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"stable_softmax: mask must be a torch.Tensor or None, got {type(mask).__name__}")
        if mask.device != x.device:
            raise ValueError(f"stable_softmax: mask is on {mask.device} but x is on {x.device}")
    if _exporting():
        return _stable_softmax_composite(x, dim, float(scale), mask)
    return torch.ops.nanops.stable_softmax.default(x, dim, float(scale), mask)


def _exporting() -> bool:
    """True inside torch.jit.trace, ONNX export and torch.export: there the softmax is written
    with standard ops, so the exported program runs where nanops is not installed."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    if torch.jit.is_tracing() or (is_exporting is not None and is_exporting()):
        return True
    # Dynamo traces torch's own ONNX check, not the flags it reads.
    return torch.onnx.is_in_onnx_export() if torch.compiler.is_compiling() else _onnx_exporting()


_onnx_flags = None


def _onnx_exporting() -> bool:
    """torch.onnx.is_in_onnx_export() without its two imports per call (2 us, a fifth of what a
    whole small stable_softmax call costs): the flags it reads, looked up once."""
    global _onnx_flags
    if _onnx_flags is None:
        _onnx_flags = onnx_export_flag()
    return bool(_onnx_flags())


def _stable_softmax_composite(x: torch.Tensor, dim: int, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """stable_softmax from standard ops, for exported graphs: the PyTorch fallback's, which gives
    the kernels' answers (fully masked rows, +inf logits and NaN rows included)."""
    return _fallback.stable_softmax(x, dim, scale, mask)


@torch.library.register_fake("nanops::stable_softmax")
def _stable_softmax_fake(x, dim, scale, mask):
    torch._check(x.dim() >= 1, lambda: "stable_softmax: x must have at least one dimension")
    if mask is not None:
        torch._check(mask.dim() <= x.dim(), lambda: "stable_softmax: mask has more dims than x")
        _fake_check_device(mask, "stable_softmax", "mask", x.device)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("nanops::stable_softmax_backward")
def _stable_softmax_backward_fake(grad_y, y, dim, scale):
    torch._check(grad_y.shape == y.shape, lambda: "stable_softmax_backward: grad_y and y shapes differ")
    _fake_check_device(grad_y, "stable_softmax_backward", "grad_y", y.device)
    return torch.empty_like(y, memory_format=torch.contiguous_format)


# The autograd of stable_softmax (and of its backward op, for double backward) is registered in
# C++ (csrc/stable_softmax_autograd.cpp): a Python autograd layer would run on every call.


# --------------------------------------------------------------------------------------------
# Grad-norm building blocks (the user-facing API is nanops.clip)
# --------------------------------------------------------------------------------------------

SUMMARY_FIELDS = 5


@torch.library.register_fake("nanops::grad_norm_summary")
def _grad_norm_summary_fake(tensors, norm_type, inv_scale):
    torch._check(len(tensors) > 0, lambda: "grad_norm_summary: empty list")
    _fake_check_one_device(tensors, "grad_norm_summary")
    _fake_check_device(inv_scale, "grad_norm_summary", "inv_scale", tensors[0].device)
    return tensors[0].new_empty((SUMMARY_FIELDS,), dtype=torch.float64)


@torch.library.register_fake("nanops::clip_coef_from_summaries")
def _clip_coef_fake(summaries, norm_type, max_norm, inv_scale, found_inf, norm_dtype):
    torch._check(summaries.dim() == 2, lambda: "clip_coef_from_summaries: summaries must be 2-D")
    _fake_check_device(inv_scale, "clip_coef_from_summaries", "inv_scale", summaries.device)
    _fake_check_device(found_inf, "clip_coef_from_summaries", "found_inf", summaries.device)
    return summaries.new_empty((), dtype=norm_dtype), summaries.new_empty((), dtype=torch.float64)


def norm_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype of a total norm: the promotion of the grads' dtypes (whatever their order),
    float32 where that is 16-bit (a float16 norm would overflow where the grads do not)."""
    it = iter(dtypes)
    dtype = next(it)
    for d in it:
        dtype = torch.promote_types(dtype, d)
    if dtype.is_complex:  # a complex grad's norm is real, as torch's
        dtype = dtype.to_real()
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@torch.library.register_fake("nanops::clip_grad_norm_")
def _clip_grad_norm_fake(grads, max_norm, norm_type, inv_scale, found_inf, scale_grads):
    torch._check(len(grads) > 0, lambda: "clip_grad_norm_: empty gradient list")
    _fake_check_one_device(grads, "clip_grad_norm_")
    _fake_check_device(inv_scale, "clip_grad_norm_", "inv_scale", grads[0].device)
    _fake_check_device(found_inf, "clip_grad_norm_", "found_inf", grads[0].device)
    g = grads[0]
    return (g.new_empty((), dtype=norm_dtype(t.dtype for t in grads)), g.new_empty((), dtype=torch.float64),
            g.new_empty((), dtype=torch.float32))


@torch.library.register_fake("nanops::scale_tensors_")
def _scale_tensors_fake(tensors, coef):
    if tensors:
        _fake_check_device(coef, "scale_tensors_", "coef", tensors[0].device)
    return None
