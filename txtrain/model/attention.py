"""Multi-head attention, vectorized over heads.

``impl=manual`` is the textbook computation, softmax(q k^T / sqrt(d) + mask) v, written out so
it can be read and inspected; ``impl=sdpa`` hands the same maths to
``F.scaled_dot_product_attention``, which picks a fused kernel (flash / memory-efficient) where
the device has one. Both give the same numbers.

Generation keeps the keys and values already computed in a ``KVCache``, so that each new token
costs one position instead of a rerun of the whole sequence (see txtrain.generate).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from txtrain.model.positions import Rotary


class LayerCache:
    """One attention layer's keys and values so far, (B, H, T, D) each; None before the first
    step. A self-attention layer appends the new positions' at every step; a cross-attention
    layer stores the source's once and reads them back."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' keys and values; returns all of them."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """What a model keeps between generation steps: a LayerCache per attention layer (by name,
    made on first use), how many positions the cache holds, and what a model computes once
    per prompt (the encoder-decoder's encoded source). ``model(new_ids, cache=cache)`` reads
    the positions before ``new_ids`` from it and adds theirs."""

    def __init__(self):
        self.length = 0
        self.layers: dict[str, LayerCache] = {}
        self.memory: tuple[torch.Tensor, torch.Tensor] | None = None

    def layer(self, name: str) -> LayerCache:
        return self.layers.setdefault(name, LayerCache())

    def grow(self, new: int) -> int:
        """Count ``new`` positions in; returns the position of the first of them."""
        self.length += new
        return self.length - new


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
                mask: torch.Tensor | None = None, cache: LayerCache | None = None) -> torch.Tensor:
        """x: (B, Tq, C) queries. memory: (B, Tk, C) keys/values for cross-attention (default x).
        mask: bool, broadcastable to (B, H, Tq, Tk), True where attending is allowed.
        cache: the keys and values of earlier steps; x holds the positions after them."""
        batch, length, width = x.shape
        q = self.split_heads(self.query(x))
        if memory is not None and cache is not None and cache.k is not None:
            k, v = cache.k, cache.v  # the source's, computed at the first step
        else:
            k, v = map(self.split_heads, self.key_value(x if memory is None else memory).chunk(2, dim=-1))
            if self.rotary is not None:  # self-attention: x's positions follow the cached ones
                start = 0 if cache is None else cache.length
                q = self.rotary.rotate(q, *self.rotary.angles(q.shape[2], q.device, start))
                k = self.rotary.rotate(k, *self.rotary.angles(k.shape[2], k.device, start))
            if cache is not None:
                k, v = cache.extend(k, v)
        dropout = self.attn_dropout if self.training else 0.0
        if self.impl == "manual":
            y = self.attend_manual(q, k, v, causal, mask, dropout)
        else:
            if causal and q.shape[2] == 1:
                causal = False  # one new query after the cached keys: it may see them all
            if causal and (mask is not None or q.shape[2] != k.shape[2]):
                # sdpa's is_causal aligns the triangle top-left; with a cache the queries are
                # the last positions, so the mask is written out (aligned at the end)
                aligned = causal_mask(q.shape[2], k.shape[2], q.device)
                mask = aligned if mask is None else mask & aligned
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
