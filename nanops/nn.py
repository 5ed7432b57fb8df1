"""Drop-in replacements for yolov5's TransformerLayer, TransformerBlock and C3TR.

Constructor signatures, attribute names, the sequence-first (L, N, C) layout and state_dict
keys are those of the `yolov5` package's models/common.py, so its weights load with
strict=True. The attention goes through nanops.stable_softmax with float32 logits even under
autocast: an overflowing q.k or a fully masked row gives finite probabilities, never NaN.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import multi_head_attention
from .transformer_layer import transformer_layer


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


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for torch.nn.MultiheadAttention whose attention never turns overflow or masking into NaN.

    Same constructor, parameters, state_dict keys, forward signature and return values as
    torch's module (batch_first, kdim/vdim, bias, add_bias_kv, add_zero_attn, dropout, bool or
    float attn_mask/key_padding_mask, need_weights, average_attn_weights, is_causal). The q·k
    logits are float32 even under autocast and the softmax is nanops.stable_softmax, so:
      * float16 logits above 65504 no longer overflow to inf (torch: NaN output);
      * a fully masked row gives zero weights and a zero attention output (torch: NaN).
    Elsewhere outputs and gradients match torch's within float32 rounding.
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """query (L, N, E) ((N, L, E) with batch_first, (L, E) unbatched), key/value likewise with
        S and kdim/vdim. Returns (attn_output, attn_weights) as torch.nn.MultiheadAttention."""
        if query.is_nested or key.is_nested or value.is_nested:
            # torch runs nested tensors only on its own paths (the fused eval-mode kernel, or its
            # own clear error): the same call, unchanged.
            return nn.MultiheadAttention.forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                                 average_attn_weights, is_causal)
        batched_first = self.batch_first and query.dim() == 3
        if batched_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = multi_head_attention(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                            average_attn_weights, is_causal)
        return (out.transpose(0, 1) if batched_first else out), weights


    def __prepare_scriptable__(self):
        raise RuntimeError(
            "torch.jit.script: nanops.nn.MultiheadAttention cannot be scripted; script a model built with "
            "torch.nn.MultiheadAttention, or export this one with torch.jit.trace / torch.export / ONNX, which keep "
            "the stable softmax as standard ops.")


class TransformerLayer(nn.Module):
    """yolov5's TransformerLayer (no LayerNorm), with NaN-free, fused attention.

    Input and output: (L, N, C), sequence first, or unbatched (L, C). ``ma`` is nanops'
    MultiheadAttention, so state_dicts match yolov5's. The forward folds the stacked
    projections (nanops.transformer_layer): three token GEMMs where yolov5 runs nine.
    """

    def __init__(self, c: int, num_heads: int):
        super().__init__()
        self.q = nn.Linear(c, c, bias=False)
        self.k = nn.Linear(c, c, bias=False)
        self.v = nn.Linear(c, c, bias=False)
        self.ma = MultiheadAttention(embed_dim=c, num_heads=num_heads)
        self.fc1 = nn.Linear(c, c, bias=False)
        self.fc2 = nn.Linear(c, c, bias=False)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (L, N, C) or (L, C). Optional masks as in nn.MultiheadAttention (off by default)."""
        return transformer_layer(self, x, attn_mask, key_padding_mask)


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
