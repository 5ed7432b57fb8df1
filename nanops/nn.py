"""Drop-in replacements for yolov5's TransformerLayer, TransformerBlock and C3TR.

Constructor signatures, attribute names, the sequence-first (L, N, C) layout and state_dict
keys are those of the `yolov5` package's models/common.py, so its weights load with
strict=True. The attention goes through nanops.stable_softmax with float32 logits even under
autocast: an overflowing q.k or a fully masked row gives finite probabilities, never NaN.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ops import stable_softmax


def _autopad(k: int, p: int | None = None, d: int = 1) -> int:
    if d > 1:
        k = d * (k - 1) + 1
    return k // 2 if p is None else p


class Conv(nn.Module):
    """yolov5's Conv (Conv2d without bias, BatchNorm2d, SiLU), same attribute names."""

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, p: int | None = None, g: int = 1, d: int = 1,
                 act: bool | nn.Module = True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, _autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.SiLU() if act is True else act if isinstance(act, nn.Module) else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class TransformerLayer(nn.Module):
    """yolov5's TransformerLayer (no LayerNorm), with NaN-free attention.

    Input and output: (L, N, C), sequence first. ``ma`` keeps nn.MultiheadAttention's
    parameters (in_proj_weight/bias, out_proj) so state_dicts match; its forward is not used.
    """

    def __init__(self, c: int, num_heads: int):
        super().__init__()
        self.q = nn.Linear(c, c, bias=False)
        self.k = nn.Linear(c, c, bias=False)
        self.v = nn.Linear(c, c, bias=False)
        self.ma = nn.MultiheadAttention(embed_dim=c, num_heads=num_heads)
        self.fc1 = nn.Linear(c, c, bias=False)
        self.fc2 = nn.Linear(c, c, bias=False)

    def attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """nn.MultiheadAttention's math (masks in its convention: bool True = not allowed,
        float = added), softmax by nanops. query (L, N, C), key/value (S, N, C) -> (L, N, C)."""
        ma = self.ma
        L, N, C = query.shape
        S, H = key.shape[0], ma.num_heads
        d = C // H
        w_q, w_k, w_v = ma.in_proj_weight.chunk(3)
        b_q, b_k, b_v = ma.in_proj_bias.chunk(3) if ma.in_proj_bias is not None else (None, None, None)
        q = F.linear(query, w_q, b_q).reshape(L, N * H, d).transpose(0, 1)
        k = F.linear(key, w_k, b_k).reshape(S, N * H, d).transpose(0, 1)
        v = F.linear(value, w_v, b_v).reshape(S, N * H, d).transpose(0, 1)
        # float32 logits whatever autocast says: a float16 q.k overflows to inf at |logit| > 65504.
        with torch.autocast(device_type=query.device.type, enabled=False):
            acc = torch.promote_types(q.dtype, torch.float32)
            logits = torch.bmm(q.to(acc), k.to(acc).transpose(1, 2)).view(N, H, L, S)
        probs = stable_softmax(logits, -1, scale=1.0 / math.sqrt(d), mask=_combined_mask(attn_mask, key_padding_mask, N, H, L, S))
        probs = probs.view(N * H, L, S).to(v.dtype)
        if ma.dropout > 0.0 and self.training:
            probs = F.dropout(probs, ma.dropout)
        out = torch.bmm(probs, v).transpose(0, 1).reshape(L, N, C)
        return ma.out_proj(out)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (L, N, C). Optional masks as in nn.MultiheadAttention (off by default)."""
        x = self.attention(self.q(x), self.k(x), self.v(x), attn_mask, key_padding_mask) + x
        return self.fc2(self.fc1(x)) + x


def _combined_mask(attn_mask, key_padding_mask, N, H, L, S):
    """nn.MultiheadAttention masks -> one stable_softmax mask broadcastable to (N, H, L, S).

    MHA: bool True = not allowed, float = added. stable_softmax: bool True = takes part."""
    masks = []
    if attn_mask is not None:
        masks.append(attn_mask.view(N, H, L, S) if attn_mask.dim() == 3 else attn_mask)
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(N, 1, 1, S))
    masks = [~m if m.dtype == torch.bool else m.float() for m in masks]
    if len(masks) < 2:
        return masks[0] if masks else None
    if all(m.dtype == torch.bool for m in masks):
        return masks[0] & masks[1]
    additive = [torch.zeros(m.shape, device=m.device).masked_fill(~m, -math.inf) if m.dtype == torch.bool else m
                for m in masks]
    return additive[0] + additive[1]


class TransformerBlock(nn.Module):
    """yolov5's TransformerBlock: optional Conv, learnable position embedding, TransformerLayers."""

    def __init__(self, c1: int, c2: int, num_heads: int, num_layers: int):
        super().__init__()
        self.conv = None
        if c1 != c2:
            self.conv = Conv(c1, c2)
        self.linear = nn.Linear(c2, c2)
        self.tr = nn.Sequential(*(TransformerLayer(c2, num_heads) for _ in range(num_layers)))
        self.c2 = c2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C1, W, H) -> (B, C2, W, H)."""
        if self.conv is not None:
            x = self.conv(x)
        b, _, w, h = x.shape
        p = x.flatten(2).permute(2, 0, 1)
        return self.tr(p + self.linear(p)).permute(1, 2, 0).reshape(b, self.c2, w, h)


class C3TR(nn.Module):
    """yolov5's C3TR: C3 whose bottlenecks are a TransformerBlock with 4 heads."""

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True, g: int = 1, e: float = 0.5):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1)
        self.cv2 = Conv(c1, c_, 1, 1)
        self.cv3 = Conv(2 * c_, c2, 1)
        self.m = TransformerBlock(c_, c_, 4, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))
