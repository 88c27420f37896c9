"""Multi-head attention, vectorized over heads.

``impl=manual`` is the textbook computation, softmax(q k^T / sqrt(d) + mask) v, written out so
it can be read and inspected; ``impl=sdpa`` hands the same maths to
``F.scaled_dot_product_attention``, which picks a fused kernel (flash / memory-efficient) where
the device has one. Both give the same numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from txtrain.model.positions import Rotary


class MultiHeadAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float = 0.0, bias: bool = True,
                 impl: str = "sdpa", rotary: Rotary | None = None):
        super().__init__()
        self.n_head = n_head
        self.head_dim = n_embd // n_head
        self.impl = impl
        self.rotary = rotary
        self.query = nn.Linear(n_embd, n_embd, bias=bias)
        self.key_value = nn.Linear(n_embd, 2 * n_embd, bias=bias)
        self.out = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout = dropout
        self.resid_dropout = nn.Dropout(dropout)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        return x.view(batch, length, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None, causal: bool = True,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, Tq, C) queries. memory: (B, Tk, C) keys/values for cross-attention (default x).
        mask: bool, broadcastable to (B, H, Tq, Tk), True where attending is allowed."""
        batch, length, width = x.shape
        source = x if memory is None else memory
        q = self.split_heads(self.query(x))
        k, v = map(self.split_heads, self.key_value(source).chunk(2, dim=-1))
        if self.rotary is not None:
            q = self.rotary.rotate(q, *self.rotary.angles(q.shape[2], q.device))
            k = self.rotary.rotate(k, *self.rotary.angles(k.shape[2], k.device))
        dropout = self.attn_dropout if self.training else 0.0
        if self.impl == "manual":
            y = self.attend_manual(q, k, v, causal, mask, dropout)
        else:
            if causal and mask is not None:
                mask = mask & causal_mask(q.shape[2], k.shape[2], q.device)
                causal = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                               is_causal=causal)
        y = y.transpose(1, 2).reshape(batch, length, width)
        return self.resid_dropout(self.out(y))

    @staticmethod
    def attend_manual(q, k, v, causal: bool, mask: torch.Tensor | None, dropout: float):
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, Tq, Tk)
        if causal:
            scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = F.dropout(weights, p=dropout, training=dropout > 0)
        return weights @ v


def causal_mask(q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """True where query i may see key j: j <= i (aligned at the end when k_len > q_len)."""
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
