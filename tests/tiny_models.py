"""The small model the trainer-adapter tests train: a Linear, a BatchNorm and an
nn.MultiheadAttention over 4 tokens, then a head; with labels=, a transformers-style output."""
import torch
from torch import nn


class TinyAttentionNet(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(16, 32)
        self.norm = nn.BatchNorm1d(32)
        self.attn = nn.MultiheadAttention(8, 2)
        self.out = nn.Linear(32, 1)

    def forward(self, x, labels=None):
        h = self.norm(self.inp(x))
        tokens = h.reshape(-1, 4, 8).transpose(0, 1)  # (4 tokens, N, 8), sequence first
        logits = self.out(self.attn(tokens, tokens, tokens, need_weights=False)[0].transpose(0, 1).reshape(-1, 32))
        if labels is None:
            return logits
        return {"loss": nn.functional.mse_loss(logits.float(), labels), "logits": logits}
