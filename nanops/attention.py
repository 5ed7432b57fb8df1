"""nn.MultiheadAttention's math with nanops' stable softmax and float32 logits.

`multi_head_attention` follows torch.nn.functional.multi_head_attention_forward step for step
(input checks and their messages, projections, bias_k/bias_v, add_zero_attn, masks, dropout,
averaged weights) and differs only where torch's answer is NaN:
  * q·k logits are accumulated in float32 (float64 for float64 inputs) even under autocast, so a
    float16 product above 65504 no longer overflows to inf;
  * a fully masked row gives zero weights and a zero attention output, not NaN.
Without need_weights the attention is fused (nanops.fused_attention: no L x S tensor); with them,
float32 logits (from 16-bit GEMMs on CUDA) go through nanops.stable_softmax.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from . import _torch_private as private
from .fused_attention import fused_attention
from .ops import stable_softmax


def _check_mask_dtype(mask: torch.Tensor | None, name: str) -> None:
    # Same rule and message as torch's _canonical_mask: integer masks would otherwise be added
    # to the logits as +1 instead of masking.
    if mask is not None and mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise AssertionError(f"only bool and floating types of {name} are supported")


def _check_float_mask_dtype(mask: torch.Tensor | None, name: str, query: torch.Tensor) -> None:
    # torch adds a float mask to the logits with baddbmm (or hands it to scaled_dot_product_
    # attention), both of which refuse a float mask of another dtype than the query's outside
    # autocast; accepting it would make the drop-in less strict than what it replaces.
    if (mask is not None and mask.dtype.is_floating_point and mask.dtype != query.dtype
            and not torch.is_autocast_enabled(query.device.type)):
        raise RuntimeError(f"Expected {name} dtype to be bool or to match query dtype, got {name} {mask.dtype} "
                           f"and query {query.dtype}")


_SOFTMAX_DTYPES: dict[tuple[str, torch.dtype, torch.dtype], torch.dtype] = {}


def _softmax_dtype(device: torch.device, input_dtype: torch.dtype) -> torch.dtype:
    """The dtype torch.softmax gives for the attention logits torch's MHA forms (bmm of the
    inputs): found once per device type and autocast dtype by asking torch on one element."""
    if not torch.is_autocast_enabled(device.type):
        return input_dtype
    lowp = torch.get_autocast_dtype(device.type)
    key = (device.type, lowp, input_dtype)
    if key not in _SOFTMAX_DTYPES:
        probe = torch.zeros(1, 1, 1, device=device, dtype=input_dtype)
        _SOFTMAX_DTYPES[key] = torch.softmax(torch.bmm(probe, probe), -1).dtype
    return _SOFTMAX_DTYPES[key]


def _as_additive(mask: torch.Tensor) -> torch.Tensor:
    """MHA's bool mask (True = not allowed) as an additive float32 mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, device=mask.device).masked_fill_(mask, -math.inf)
    return mask


def combined_mask(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    bsz: int,
    num_heads: int,
    tgt_len: int,
    src_len: int,
) -> torch.Tensor | None:
    """MHA masks (bool True = not allowed, float = added) as one stable_softmax mask
    broadcastable to (bsz, num_heads, tgt_len, src_len) (bool True = takes part, float = added).

    attn_mask: (tgt_len, src_len) or (bsz * num_heads, tgt_len, src_len); key_padding_mask:
    (bsz, src_len). Two bool masks stay bool (no float copy of the logits' size)."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask.view(bsz, num_heads, tgt_len, src_len) if attn_mask.dim() == 3 else attn_mask)
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(bsz, 1, 1, src_len))
    if not masks:
        return None
    if all(m.dtype == torch.bool for m in masks):
        allowed = ~masks[0]
        return allowed if len(masks) == 1 else allowed & ~masks[1]
    additive = [_as_additive(m) for m in masks]
    return additive[0] if len(additive) == 1 else additive[0] + additive[1]


def _check_mask_shapes(attn_mask, key_padding_mask, bsz, num_heads, tgt_len, src_len) -> None:
    # torch's messages, so a user moving from nn.MultiheadAttention reads the same error.
    if attn_mask is not None:
        if attn_mask.dim() == 2 and attn_mask.shape != (tgt_len, src_len):
            raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                               f"{(tgt_len, src_len)}.")
        if attn_mask.dim() == 3 and attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
            raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                               f"{(bsz * num_heads, tgt_len, src_len)}.")
    if key_padding_mask is not None:
        if key_padding_mask.shape[0] != bsz:
            raise AssertionError(f"Expected key_padded_mask.shape[0] to be {bsz}, but got {key_padding_mask.shape[0]}")
        if key_padding_mask.shape[1] != src_len:
            raise AssertionError(f"Expected key_padded_mask.shape[1] to be {src_len}, but got "
                                 f"{key_padding_mask.shape[1]}")


class _Logits16(torch.autograd.Function):
    """q·kᵀ of 16-bit q and k as float32 logits, from 16-bit GEMMs with a float32 output (tensor
    cores, no float32 copies of q and k). Its own autograd: torch has no derivative for bmm's
    out_dtype form. The logits' gradient goes back in q's dtype, as it does in torch's attention."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(q, k)
        if q.is_cuda:
            return torch.bmm(q, k.transpose(1, 2), out_dtype=torch.float32)
        return torch.bmm(q.float(), k.float().transpose(1, 2))  # CPU: no such GEMM (tests only)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k = ctx.saved_tensors
        g = grad.to(q.dtype)
        grad_q = torch.bmm(g, k) if ctx.needs_input_grad[0] else None
        grad_k = torch.bmm(g.transpose(1, 2), q) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k


def _has_16bit_gemm_to_float32() -> bool:
    global _GEMM_TO_FLOAT32
    if _GEMM_TO_FLOAT32 is None:
        _GEMM_TO_FLOAT32 = private.has_kernel("aten::bmm.dtype", "CUDA")
    return _GEMM_TO_FLOAT32


_GEMM_TO_FLOAT32: bool | None = None


def attention_logits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (B, L, E) · k (B, S, E)ᵀ as (B, L, S) logits in float32 (float64 for float64 inputs),
    whatever autocast says: a float16 q·k overflows to inf above 65504."""
    with torch.autocast(device_type=q.device.type, enabled=False):
        if q.is_cuda and q.dtype == k.dtype and q.dtype in (torch.float16, torch.bfloat16) \
                and _has_16bit_gemm_to_float32():
            return _Logits16.apply(q, k)
        acc = torch.promote_types(q.dtype, torch.float32)
        return torch.bmm(q.to(acc), k.to(acc).transpose(1, 2))


def _project(query, key, value, mha) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)


def multi_head_attention(
    mha: torch.nn.MultiheadAttention,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    need_weights: bool = True,
    attn_mask: torch.Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
    projected: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The forward of `mha` (an nn.MultiheadAttention's parameters and options), sequence first.

    query (L, N, E) or unbatched (L, E); key/value (S, N, kdim/vdim) or (S, kdim/vdim).
    projected: q, k, v already through mha's in-projection (shaped as query, key, value with E
    features), when the caller folded it into its own projection (see nanops.layer).
    Returns the output (L, N, E) and, with need_weights, the attention weights (N, L, S) averaged
    over heads, or (N, num_heads, L, S) with average_attn_weights=False (no N when unbatched).
    """
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, mha.num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if projected is not None:
            projected = tuple(t.unsqueeze(1) for t in projected)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    _check_mask_dtype(key_padding_mask, "key_padding_mask")
    _check_mask_dtype(attn_mask, "attn_mask")
    if (key_padding_mask is not None and attn_mask is not None and key_padding_mask.dtype != attn_mask.dtype):
        warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. Use same type for "
                      "both instead.", stacklevel=3)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    # torch's rule: without weights or a key padding mask, the is_causal hint replaces attn_mask
    # (its scaled_dot_product_attention then masks causally, whatever attn_mask held).
    causal = is_causal and key_padding_mask is None and not need_weights
    if causal:
        attn_mask = None
    _check_float_mask_dtype(attn_mask, "attn_mask", query)
    _check_float_mask_dtype(key_padding_mask, "key_padding_mask", query)

    tgt_len, bsz, embed_dim = query.shape
    num_heads = mha.num_heads
    if embed_dim != mha.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {mha.embed_dim}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if mha._qkv_same_embed_dim and key.shape != value.shape:
        raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
    if not mha._qkv_same_embed_dim and key.shape[:2] != value.shape[:2]:
        raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's {value.shape[:2]}")
    _check_mask_shapes(attn_mask, key_padding_mask, bsz, num_heads, tgt_len, key.shape[0])

    q, k, v = _project(query, key, value, mha) if projected is None else projected
    if mha.bias_k is not None and mha.bias_v is not None:
        k = torch.cat([k, mha.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, mha.bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.reshape(k.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(v.shape[0], bsz * num_heads, head_dim).transpose(0, 1)
    if mha.add_zero_attn:
        zeros = (bsz * num_heads, 1, head_dim)
        k = torch.cat([k, k.new_zeros(zeros)], dim=1)
        v = torch.cat([v, v.new_zeros(zeros)], dim=1)
        attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
    src_len = k.shape[1]
    scale = 1.0 / math.sqrt(head_dim)
    dropout_p = mha.dropout if mha.training else 0.0
    mask = combined_mask(attn_mask, key_padding_mask, bsz, num_heads, tgt_len, src_len)

    out = None
    if not need_weights:
        # Nothing needs the (L, S) weights: a fused kernel with float32 accumulators, when one
        # takes the call (else the stable path below).
        out = fused_attention(q.view(bsz, num_heads, tgt_len, head_dim), k.view(bsz, num_heads, src_len, head_dim),
                              v.view(bsz, num_heads, src_len, head_dim), mask, scale=scale, dropout_p=dropout_p,
                              causal=causal)
    probs = None
    if out is None:
        logits = attention_logits(q, k).view(bsz, num_heads, tgt_len, src_len)
        if causal:  # scaled_dot_product_attention's is_causal: position j takes part for j <= i
            mask = torch.ones(tgt_len, src_len, dtype=torch.bool, device=q.device).tril()
        probs = stable_softmax(logits, -1, scale=scale, mask=mask).view(bsz * num_heads, tgt_len, src_len)
        dropped = F.dropout(probs, p=dropout_p) if dropout_p > 0.0 else probs
        out = torch.bmm(dropped.to(v.dtype), v)
    else:
        out = out.view(bsz * num_heads, tgt_len, head_dim)
    out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
    out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias).view(tgt_len, bsz, -1)

    weights = None
    if need_weights:
        # The dtype torch's softmax answers in: the inputs' without autocast; under autocast what
        # its policy for softmax says on this device (float32 on CUDA, the autocast dtype on CPU).
        weights = probs.to(_softmax_dtype(q.device, query.dtype))
        weights = weights.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    if not is_batched:
        out = out.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights
