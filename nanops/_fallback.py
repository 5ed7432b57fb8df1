"""Every nanops op in PyTorch, for where the compiled kernels cannot serve a tensor.

The same schemas (nanops/ops.def) and the same answers as the kernels, computed with torch's own
operators: the compiled extension could not be imported (no compiler at install, a torch
upgraded since the build, ROCm, macOS), it has no kernels for a device type (MPS, XPU, CUDA in a
CPU-only build), or none for the GPU's architecture. `nanops._loader` registers these once, at
import, under the ops' own names: callers never branch and never catch a kernel's error.

Slower than the kernels (several passes where they make one, Python per tensor of a list), but
free of the overflows they avoid: norms in float64 relative to the largest magnitude, softmax
accumulated in float32.
"""
from __future__ import annotations

import math
import re
from importlib import resources

import torch

from ._torch_private import foreach_norm

_SCHEMA = re.compile(r'^NANOPS_OP\("(.+)"\)\s*$')


def schemas() -> dict[str, str]:
    """name -> schema, from nanops/ops.def (the list csrc/ops.cpp compiles)."""
    text = resources.files("nanops").joinpath("ops.def").read_text()
    found = {}
    for line in text.splitlines():
        match = _SCHEMA.match(line.strip())
        if match:
            schema = match.group(1)
            found[schema.split("(", 1)[0]] = schema
    return found


# --------------------------------------------------------------------------------------------
# The argument checks of the compiled ops (csrc/tensor_list.cpp, csrc/softmax_problem.cpp), with
# their messages: a program fails the same way on either path.
# --------------------------------------------------------------------------------------------

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_list(tensors, op: str, integers_count_as_finite: bool) -> None:
    if not tensors:
        return
    device = tensors[0].device
    for i, t in enumerate(tensors):
        torch._check_value(t.device == device, lambda: f"{op}: all tensors must be on one device, but tensors[0] is on "
                                                 f"{device} and tensors[{i}] is on {t.device}")
        torch._check_value(t.layout == torch.strided, lambda: f"{op}: tensors[{i}] has layout {t.layout}; only dense "
                                                          "(strided) tensors are supported, call .to_dense() first")
        integral = not t.is_floating_point() and not t.is_complex()
        torch._check_value(t.dtype in KERNEL_DTYPES or (integral and integers_count_as_finite),
                     lambda: f"{op}: tensors[{i}] has dtype {_dtype_name(t.dtype)}; supported dtypes are float32, float16, "
                             "bfloat16 and float64")


def _check_nonempty(tensors, op: str) -> None:
    # A RuntimeError, as the compiled op's: the dispatcher finds no device to run an empty list on.
    torch._check(len(tensors) > 0, lambda: f"{op}: empty tensor list (no tensor, no device to run on)")


_C10_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
              torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
              torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
              torch.complex32: "ComplexHalf"}


def _dtype_name(dtype: torch.dtype) -> str:
    """The dtype as the compiled ops name it (c10's ScalarType names)."""
    return _C10_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _check_scalar(t, op: str, name: str, device) -> None:
    if t is None:
        return
    torch._check_value(t.numel() == 1, lambda: f"{op}: {name} must hold exactly one element, got shape {tuple(t.shape)}")
    torch._check_value(t.dtype in (torch.float32, torch.float64), lambda: f"{op}: {name} must be float32 or float64, "
                                                                     f"got {_dtype_name(t.dtype)}")
    torch._check_value(t.device == device, lambda: f"{op}: {name} is on {t.device} but the tensors are on {device}")


def _check_clip_scalars(norm_type: float, max_norm: float, op: str) -> None:
    torch._check_value(norm_type >= 0.0, lambda: f"{op}: norm_type must be >= 0 or inf, got {norm_type}")
    torch._check_value(max_norm >= 0.0, lambda: f"{op}: max_norm must be >= 0 (inf allowed), got {max_norm}")


def _check_softmax(x: torch.Tensor, mask: torch.Tensor | None) -> None:
    torch._check(x.dtype in KERNEL_DTYPES, lambda: f"stable_softmax: x has dtype {_dtype_name(x.dtype)}; supported dtypes are "
                                                   "float32, float16, bfloat16 and float64")
    torch._check(x.layout == torch.strided, lambda: "stable_softmax: x must be a dense (strided) tensor")
    torch._check(x.dim() >= 1, lambda: "stable_softmax: x must have at least one dimension (got a scalar)")
    if mask is None:
        return
    torch._check(mask.device == x.device, lambda: f"stable_softmax: mask is on {mask.device} but x is on {x.device}")
    torch._check(mask.dtype == torch.bool or mask.dtype in KERNEL_DTYPES,
                 lambda: f"stable_softmax: mask has dtype {_dtype_name(mask.dtype)}; pass a bool mask (True = takes part) or a "
                         "floating additive mask")
    torch._check(mask.dim() <= x.dim(), lambda: f"stable_softmax: mask of shape {tuple(mask.shape)} has more "
                                                f"dimensions than x of shape {tuple(x.shape)}")
    for i in range(1, mask.dim() + 1):
        torch._check(mask.shape[-i] in (x.shape[-i], 1),
                     lambda: f"stable_softmax: mask of shape {tuple(mask.shape)} does not broadcast to x of shape "
                             f"{tuple(x.shape)} (dim {-i}: {mask.shape[-i]} vs {x.shape[-i]})")


# --------------------------------------------------------------------------------------------
# NaN / Inf detection
# --------------------------------------------------------------------------------------------

def _floating(t: torch.Tensor) -> bool:
    return t.is_floating_point() and t.numel() > 0


_CHUNK = 1 << 24  # elements per pass: a 2^31-element tensor's masks stay 16 MB, not 2 GB


def _pieces(t: torch.Tensor):
    flat = t.reshape(-1)
    return flat.split(_CHUNK) if flat.numel() > _CHUNK else (flat,)


def nonfinite_counts(tensors: list[torch.Tensor]) -> torch.Tensor:
    _check_nonempty(tensors, "nonfinite_counts")
    _check_list(tensors, "nonfinite_counts", True)
    rows = []
    for t in tensors:
        row = torch.zeros(3, dtype=torch.long, device=t.device)
        if _floating(t):
            for piece in _pieces(t):
                row += torch.stack([piece.isnan().sum(), piece.isposinf().sum(), piece.isneginf().sum()])
        rows.append(row)
    return torch.stack(rows)


def _any_nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    flags = [(~torch.isfinite(piece)).any() for t in tensors if _floating(t) for piece in _pieces(t)]
    if not flags:
        return torch.zeros((), dtype=torch.bool, device=tensors[0].device)
    return torch.stack(flags).any()


def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    _check_nonempty(tensors, "all_finite")
    _check_list(tensors, "all_finite", True)
    return ~_any_nonfinite(tensors)


def nonfinite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    _check_nonempty(tensors, "nonfinite_flag")
    _check_list(tensors, "nonfinite_flag", True)
    return _any_nonfinite(tensors).to(torch.float32).reshape(1)


# --------------------------------------------------------------------------------------------
# Stable softmax
# --------------------------------------------------------------------------------------------

def stable_softmax(x: torch.Tensor, dim: int, scale: float, mask: torch.Tensor | None) -> torch.Tensor:
    """The kernels' rules exactly: a row with no position taking part gives 0; +inf logits share
    the row equally; NaN stays NaN; 16-bit input accumulated in float32."""
    _check_softmax(x, mask)
    dim = dim if dim >= 0 else dim + x.dim()
    if dim < 0 or dim >= x.dim():
        raise IndexError(f"Dimension out of range (expected to be in range of [{-x.dim()}, {x.dim() - 1}], "
                         f"but got {dim})")
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    acc = torch.promote_types(x.dtype, torch.float32)
    z = x.to(acc) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            z = z.masked_fill(~mask, -math.inf)
        else:
            add = mask.to(acc)
            z = torch.where(add == -math.inf, add, z + add)  # -inf masks even a +inf or NaN logit
    pos_inf = z == math.inf
    shares = pos_inf.sum(dim, keepdim=True)
    row_max = z.amax(dim, keepdim=True)
    finite_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(z - finite_max)
    total = e.sum(dim, keepdim=True)
    y = e / torch.where(total > 0, total, torch.ones_like(total))
    y = torch.where(shares > 0, pos_inf.to(acc) / shares.clamp(min=1), y)
    y = torch.where(row_max.isnan(), row_max, y)  # a NaN anywhere in the row
    return y.to(x.dtype).contiguous()


def stable_softmax_backward(grad_y: torch.Tensor, y: torch.Tensor, dim: int, scale: float) -> torch.Tensor:
    torch._check(grad_y.shape == y.shape, lambda: f"stable_softmax_backward: grad_y of shape {tuple(grad_y.shape)} "
                                                  f"does not match y of shape {tuple(y.shape)}")
    torch._check(grad_y.device == y.device, lambda: f"stable_softmax_backward: grad_y is on {grad_y.device} but y "
                                                    f"is on {y.device}")
    torch._check(grad_y.dtype == y.dtype, lambda: f"stable_softmax_backward: grad_y has dtype {grad_y.dtype} but y "
                                                  f"has dtype {y.dtype}")
    if y.numel() == 0:
        return torch.empty_like(y, memory_format=torch.contiguous_format)
    acc = torch.promote_types(y.dtype, torch.float32)
    g, p = grad_y.to(acc), y.to(acc)
    return (scale * p * (g - (g * p).sum(dim, keepdim=True))).to(y.dtype).contiguous()


def _softmax_setup(ctx, inputs, output):
    _, dim, scale, mask = inputs
    ctx.dim, ctx.scale = dim, scale
    ctx.mask_shape = mask.shape if mask is not None and mask.is_floating_point() else None
    ctx.save_for_backward(output)


def _softmax_grad(ctx, grad):
    # As csrc/stable_softmax_autograd.cpp: an additive mask gets the Jacobian product without
    # the scale, summed to its shape; x gets it times the scale.
    (y,) = ctx.saved_tensors
    backward = torch.ops.nanops.stable_softmax_backward.default
    if ctx.mask_shape is not None and ctx.needs_input_grad[3]:
        grad_z = backward(grad, y, ctx.dim, 1.0)
        grad_x = grad_z * ctx.scale if ctx.needs_input_grad[0] else None
        return grad_x, None, None, grad_z.sum_to_size(ctx.mask_shape)
    return backward(grad, y, ctx.dim, ctx.scale), None, None, None


def _softmax_backward_setup(ctx, inputs, output):
    grad_y, y, dim, scale = inputs
    ctx.dim, ctx.scale = dim, scale
    ctx.save_for_backward(grad_y, y)


def _softmax_backward_grad(ctx, gg):
    # grad_x = s * y * (g - <g, y>): linear in g, bilinear in (g, y) (csrc/stable_softmax_autograd.cpp).
    grad_y, y = ctx.saved_tensors
    gg = gg * ctx.scale
    dot_ggy = (gg * y).sum(ctx.dim, keepdim=True)
    d_grad_y = y * gg - y * dot_ggy
    d_y = gg * (grad_y - (grad_y * y).sum(ctx.dim, keepdim=True)) - grad_y * dot_ggy
    return d_grad_y, d_y, None, None


# --------------------------------------------------------------------------------------------
# Grad norms (norm_math.h's representation: norm^p = scale^p * rel, float64, never overflowing)
# --------------------------------------------------------------------------------------------

def _kind(p: float) -> str:
    return {0.0: "zero", 1.0: "one", 2.0: "two"}.get(p, "inf" if math.isinf(p) else "general")


def grad_norm_summary(tensors: list[torch.Tensor], norm_type: float, inv_scale: torch.Tensor | None) -> torch.Tensor:
    _check_nonempty(tensors, "grad_norm_summary")
    torch._check_value(norm_type >= 0.0, lambda: f"grad_norm_summary: norm_type must be >= 0 or inf, got {norm_type}")
    _check_list(tensors, "grad_norm_summary", False)
    _check_scalar(inv_scale, "grad_norm_summary", "inv_scale", tensors[0].device)
    device = tensors[0].device
    s = inv_scale.to(device=device, dtype=torch.float64).reshape(()) if inv_scale is not None else None
    kind = _kind(norm_type)
    zero = torch.zeros((), dtype=torch.float64, device=device)
    if kind in ("one", "two") and all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in tensors):
        return _summary_of_16_32_bit(tensors, norm_type, s, zero)
    amax, count, has_nan, has_inf = zero, zero, zero, zero
    magnitudes = []
    for t in tensors:
        if t.numel() == 0:
            continue
        v = t.detach().to(torch.float64).abs()
        if s is not None:
            v = v * s
        has_nan = torch.maximum(has_nan, v.isnan().any().to(torch.float64))
        has_inf = torch.maximum(has_inf, v.isinf().any().to(torch.float64))
        finite = torch.where(torch.isfinite(v), v, zero)
        amax = torch.maximum(amax, finite.amax())
        if kind == "zero":
            count = count + (v != 0).sum()
        magnitudes.append(finite)
    if kind in ("zero", "inf"):
        return torch.stack([torch.ones_like(zero), count, amax, has_nan, has_inf])
    rel = zero
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    for finite in magnitudes:
        rel = rel + (finite / safe).pow(norm_type).sum()
    return torch.stack([amax, rel, amax, has_nan, has_inf])


def _summary_of_16_32_bit(tensors, norm_type: float, s, zero) -> torch.Tensor:
    """The common case in two foreach launches: per-tensor norms accumulated in float64, where
    |x|^p of a float32 (<= 3.4e38) cannot overflow for p <= 2, so the summary's scale is 1."""
    parts = [t.detach() for t in tensors if t.numel() > 0]
    if not parts:
        return torch.stack([torch.ones_like(zero), zero, zero, zero, zero])
    norms = torch.stack(foreach_norm(parts, norm_type, dtype=torch.float64))
    peaks = torch.stack(foreach_norm(parts, math.inf, dtype=torch.float64))
    if s is not None:
        norms, peaks = norms * s, peaks * s
    has_nan = norms.isnan().any().to(torch.float64)
    has_inf = norms.isinf().any().to(torch.float64)
    finite = torch.isfinite(norms)
    rel = torch.where(finite, norms, zero).pow(norm_type).sum()
    amax = torch.where(torch.isfinite(peaks), peaks, zero).amax()
    return torch.stack([torch.ones_like(zero), rel, amax, has_nan, has_inf])


def _norm_and_coef(rows: torch.Tensor, norm_type: float, max_norm: float, inv_scale, found_inf, dtype):
    kind = _kind(norm_type)
    scales, rels = rows[:, 0], rows[:, 1]
    has_nan, has_inf = rows[:, 3].amax() != 0, rows[:, 4].amax() != 0
    amax = rows[:, 2].amax()
    if kind == "zero":
        norm = rels.sum()
    elif kind == "inf":
        norm = torch.where(has_inf, torch.full_like(amax, math.inf), amax)
    else:
        scale = torch.where(rels > 0, scales, torch.zeros_like(scales)).amax()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        rel = (rels * (scales / safe).pow(norm_type)).sum()
        norm = safe * rel.pow(1.0 / norm_type)
        norm = torch.where(rel == 0, torch.zeros_like(norm), norm)
        norm = torch.where(has_inf, torch.full_like(norm, math.inf), norm)
    norm = torch.where(has_nan, torch.full_like(norm, math.nan), norm)
    norm = torch.where(norm > torch.finfo(dtype).max, torch.full_like(norm, math.inf), norm)
    nonfinite = has_nan | has_inf | ~torch.isfinite(norm)
    s = inv_scale.to(rows.device, torch.float64).reshape(()) if inv_scale is not None else torch.ones_like(norm)
    coef = torch.where(nonfinite, torch.ones_like(norm), s * torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    if found_inf is not None:
        found_inf.copy_(torch.where(nonfinite, torch.ones_like(found_inf), found_inf))
    return norm.to(dtype), coef


def clip_coef_from_summaries(summaries, norm_type, max_norm, inv_scale, found_inf, norm_dtype):
    torch._check(summaries.dim() == 2 and summaries.shape[1] == 5 and summaries.dtype == torch.float64,
                 lambda: f"clip_coef_from_summaries: summaries must be float64 of shape (k, 5), got {summaries.dtype} "
                         f"{tuple(summaries.shape)}")
    _check_scalar(inv_scale, "clip_coef_from_summaries", "inv_scale", summaries.device)
    _check_scalar(found_inf, "clip_coef_from_summaries", "found_inf", summaries.device)
    return _norm_and_coef(summaries, norm_type, max_norm, inv_scale, found_inf, norm_dtype)


def _norm_dtype(tensors) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def scale_tensors_(tensors: list[torch.Tensor], coef: torch.Tensor) -> None:
    if not tensors:
        return
    _check_list(tensors, "scale_tensors_", False)
    device = tensors[0].device
    torch._check(coef.numel() == 1 and coef.dtype == torch.float64 and coef.device == device,
                 lambda: f"scale_tensors_: coef must be a one-element float64 tensor on {device}, got {coef.dtype} "
                         f"of shape {tuple(coef.shape)} on {coef.device}")
    c = coef.reshape(())
    for t in tensors:
        if t.numel() == 0:
            continue
        if t.dtype in (torch.float16, torch.bfloat16, torch.float32):  # the kernels form it in float32
            t.copy_(t.float().mul_(c.float()))
        else:
            t.mul_(c.to(t.dtype))


def clip_grad_norm_(grads, max_norm, norm_type, inv_scale, found_inf, scale_grads):
    torch._check(len(grads) > 0, lambda: "clip_grad_norm_: empty gradient list")
    _check_clip_scalars(norm_type, max_norm, "clip_grad_norm_")
    _check_list(grads, "clip_grad_norm_", False)
    _check_scalar(inv_scale, "clip_grad_norm_", "inv_scale", grads[0].device)
    _check_scalar(found_inf, "clip_grad_norm_", "found_inf", grads[0].device)
    summary = grad_norm_summary(grads, norm_type, inv_scale)
    norm, coef = _norm_and_coef(summary.reshape(1, -1), norm_type, max_norm, inv_scale, found_inf, _norm_dtype(grads))
    if scale_grads:
        # The kernels leave the memory untouched when coef is exactly 1; the result is the same.
        scale_tensors_(grads, coef)
    return norm, coef, (1.0 / coef).to(torch.float32)


IMPLEMENTATIONS = {
    "nonfinite_counts": nonfinite_counts,
    "all_finite": all_finite,
    "nonfinite_flag": nonfinite_flag,
    "stable_softmax": stable_softmax,
    "stable_softmax_backward": stable_softmax_backward,
    "grad_norm_summary": grad_norm_summary,
    "clip_coef_from_summaries": clip_coef_from_summaries,
    "clip_grad_norm_": clip_grad_norm_,
    "scale_tensors_": scale_tensors_,
}

AUTOGRAD = {
    "stable_softmax": (_softmax_grad, _softmax_setup),
    "stable_softmax_backward": (_softmax_backward_grad, _softmax_backward_setup),
}
