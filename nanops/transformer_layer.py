"""yolov5's TransformerLayer math with its stacked projections folded, and fused attention.

yolov5's layer (models/common.py; ultralytics' is the same) computes

    x = ma(q(x), k(x), v(x))[0] + x
    x = fc2(fc1(x)) + x

where q, k, v, fc1, fc2 are Linear layers and ma an nn.MultiheadAttention, whose in-projection
follows q, k and v with nothing in between, as fc2 follows fc1. Two linear maps in a row are one:
W_in_q (W_q x + b_q) + b_in_q = (W_in_q W_q) x + (W_in_q b_q + b_in_q). So the layer runs three
token-sized GEMMs where yolov5 runs nine (one for q, k and v together, out_proj, fc), plus
four C x C products of the weights per call, and never forms the 16-bit intermediate q(x) that
can itself overflow float16. Gradients reach every original parameter through autograd. The
attention is nanops' (fused when a kernel takes it, stable always).

The fold skips the calls of q, k, v, ma, fc1 and fc2 as modules, so it is used only where no
one would notice: no hook on those modules or process-wide (nanops' own locators, promotion,
watch, FSDP install hooks, and then the layer runs module by module), plain nn.Linear layers
(not LoRA or quantized ones), and enough tokens that the C x C products are cheap beside the
GEMMs they replace (L * N >= 2 * C).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import _torch_private as private
from .attention import multi_head_attention


def _linear_pair(first: nn.Linear, second_weight: torch.Tensor, second_bias: torch.Tensor | None):
    """The weight and bias of x -> second(first(x)), formed in float32 (or the weights' dtype if
    wider) outside autocast: the C x C product must not round to float16 twice."""
    w = second_weight @ first.weight
    b = second_bias
    if first.bias is not None:
        folded = second_weight @ first.bias
        b = folded if b is None else b + folded
    return w, b


def _foldable(layer: nn.Module, x: torch.Tensor) -> bool:
    linears = (layer.q, layer.k, layer.v, layer.fc1, layer.fc2)
    if any(type(m) is not nn.Linear for m in linears) or not isinstance(layer.ma, nn.MultiheadAttention):
        return False
    if not layer.ma._qkv_same_embed_dim or x.dim() != 3 or x.shape[0] * x.shape[1] < 2 * x.shape[-1]:
        return False
    modules = (*linears, layer.ma)
    if any(getattr(m, "runs_in_float32", False) for m in modules):
        return False  # a module promoted to float32 runs as a module
    return not private.hooks_observe(modules)


def transformer_layer(
    layer: nn.Module,
    x: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The forward of a yolov5 TransformerLayer `layer` (attributes q, k, v, ma, fc1, fc2).

    x: (L, N, C) sequence first, or unbatched (L, C), any floating dtype (autocast respected).
    Masks as in nn.MultiheadAttention (yolov5 passes none). Returns (L, N, C) like x.
    """
    ma = layer.ma
    if not _foldable(layer, x):  # module by module, as yolov5 runs it (hooks see every call)
        x = ma(layer.q(x), layer.k(x), layer.v(x), key_padding_mask=key_padding_mask, need_weights=False,
               attn_mask=attn_mask)[0] + x
        return layer.fc2(layer.fc1(x)) + x
    c = x.shape[-1]
    with torch.autocast(x.device.type, enabled=False):
        w_in = ma.in_proj_weight.chunk(3)
        b_in = ma.in_proj_bias.chunk(3) if ma.in_proj_bias is not None else (None, None, None)
        folded = [_linear_pair(lin, w, b) for lin, w, b in zip((layer.q, layer.k, layer.v), w_in, b_in)]
        w_qkv = torch.cat([w for w, _ in folded])
        b_qkv = None if all(b is None for _, b in folded) else torch.cat(
            [b if b is not None else w.new_zeros(c) for w, b in folded])
        w_fc, b_fc = _linear_pair(layer.fc1, layer.fc2.weight, layer.fc2.bias)
    q, k, v = F.linear(x, w_qkv, b_qkv).chunk(3, dim=-1)
    x = multi_head_attention(ma, x, x, x, key_padding_mask, False, attn_mask, projected=(q, k, v))[0] + x
    return F.linear(x, w_fc, b_fc) + x
