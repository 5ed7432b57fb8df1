"""Attention without the L x S matrix, with the stable path's promises, through torch's fused kernels.

softmax(q·kᵀ·scale + mask)·v by torch.nn.functional.scaled_dot_product_attention on a backend
that accumulates q·k and the softmax in float32 and never stores the logits (FlashAttention,
memory-efficient and cuDNN on CUDA, the flash kernel on CPU): a float16 q·k far above 65504 stays
finite, and no L x S tensor is formed. What nanops adds on top, for every backend and torch
release:

  * a row that no key may attend (fully masked) gives a zero output and zero gradients: the
    backend sees that row unmasked (so it computes nothing non-finite) and its output is zeroed;
  * +inf in an additive mask gives its positions the whole row, weighted by their logits (a
    backend would give NaN; stable_softmax, on the need_weights=True path, gives them equal shares);
  * masked calls on CUDA never reach cuDNN, whose masked attention gives NaN on torch 2.11
    (grad_q when L % 128 == 64; outputs with a float32 mask and float16 queries);
  * a call that only the math backend could take (dropout on CPU, unaligned head dims) is left to
    the caller's stable path: `fused_attention` returns None.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _torch_private as private


def _sdpa_mask(mask: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask a backend can take for this one (bool or additive, broadcastable to (..., L, S)),
    and the rows nothing may attend, (..., L, 1) bool. Costs passes over the mask, not the logits."""
    if mask.dtype == torch.bool:
        dead = ~mask.any(-1, keepdim=True)
        return mask | dead, dead
    dead = (mask == -math.inf).all(-1, keepdim=True)
    pos_inf = mask == math.inf
    only_pos_inf = torch.where(pos_inf, 0.0, -math.inf).to(mask.dtype)
    mask = torch.where(pos_inf.any(-1, keepdim=True), only_pos_inf, mask).masked_fill(dead, 0.0)
    if mask.dtype != dtype:
        # SDPA takes a float mask in q's dtype only; a -1e9 float32 entry becomes float16's most
        # negative finite value (still masking), not -inf (which would change a row of them).
        info = torch.finfo(dtype)
        if info.max < torch.finfo(mask.dtype).max:
            mask = torch.where(torch.isinf(mask), mask, mask.clamp(info.min, info.max))
        mask = mask.to(dtype)
    return mask, dead


def _sdpa(q, k, v, mask, dropout_p: float, causal: bool, scale: float) -> torch.Tensor | None:
    if torch.compiler.is_compiling():
        # Dynamo cannot trace torch's backend choice: the compiled call keeps cuDNN out with
        # torch's public context (its host cost is paid once, at trace time).
        if mask is not None and q.device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, causal, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, causal, scale=scale)
    if private.fused_sdp_choice(q, k, v, mask, dropout_p, causal, scale=scale) not in private.FUSED_BACKENDS:
        return None
    return F.scaled_dot_product_attention(q, k, v, mask, dropout_p, causal, scale=scale)


def fused_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale: float,
    dropout_p: float = 0.0,
    causal: bool = False,
) -> torch.Tensor | None:
    """softmax(q·kᵀ·scale + mask)·v by a fused kernel, or None when none can take the call.

    q: (N, H, L, E); k: (N, H, S, E); v: (N, H, S, Ev); float32/float16/bfloat16/float64, one
    device. mask: None, bool (True = takes part) or additive floating, broadcastable to
    (N, H, L, S) (stable_softmax's convention). causal: position j takes part for j <= i (mask
    must then be None). Returns (N, H, L, Ev) in q's dtype (autocast's, under autocast).
    """
    device = q.device.type
    if device not in ("cpu", "cuda"):
        return None
    if q.dtype == torch.float32 and torch.is_autocast_enabled(device):
        # What autocast would hand the kernel, done here so that the mask is made for that dtype.
        low = torch.get_autocast_dtype(device)
        q, k, v = q.to(low), k.to(low), v.to(low)
    dead = None
    if mask is not None:
        mask, dead = _sdpa_mask(mask, q.dtype)
    if mask is not None and device == "cuda" and not torch.compiler.is_compiling():
        with private.cudnn_sdp_off():
            out = _sdpa(q, k, v, mask, dropout_p, causal, scale)
    else:
        out = _sdpa(q, k, v, mask, dropout_p, causal, scale)
    if out is None or dead is None:
        return out
    return out.masked_fill(dead, 0.0)
