"""Position information: added to the token embeddings (learned, sinusoidal) or rotated into
queries and keys inside attention (rope, a relative scheme)."""

from __future__ import annotations

import math

import torch
from torch import nn


class LearnedPositions(nn.Module):
    """A trained vector per position; cannot describe positions past its table."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.table = nn.Embedding(max_len, dim)

    def forward(self, length: int, device: torch.device, start: int = 0) -> torch.Tensor:
        """The encodings of positions start .. start + length - 1."""
        if start + length > self.table.num_embeddings:
            raise ValueError(f"sequence of {start + length} tokens is longer than the learned position "
                             f"table ({self.table.num_embeddings}); raise model.max_seq_len")
        return self.table(torch.arange(start, start + length, device=device))


def sinusoid_table(length: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """The 2017 Transformer's encoding: sin on even channels, cos on odd, wavelengths 2pi..1e4*2pi."""
    position = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    rate = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device)
                     * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * rate)
    table[:, 1::2] = torch.cos(position * rate[: dim // 2])
    return table


class SinusoidalPositions(nn.Module):
    """Fixed encodings, defined for any length (computed on first use, then cached)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.register_buffer("cache", torch.zeros(0, dim), persistent=False)

    def forward(self, length: int, device: torch.device, start: int = 0) -> torch.Tensor:
        """The encodings of positions start .. start + length - 1."""
        end = start + length
        if self.cache.shape[0] < end or self.cache.device != device:
            self.cache = sinusoid_table(max(end, 2 * self.cache.shape[0]), self.dim, device)
        return self.cache[start:end]


class Rotary(nn.Module):
    """Rotary position embedding (RoPE): rotates each pair of channels (i, i + d/2) of a query
    or key by an angle proportional to its position, so q.k depends on the offset only."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        # On the CPU whatever the default device: on the meta device (the memory planner's model)
        # the first arithmetic imports torch's decompositions, seconds of start-up for nothing.
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)
        self.register_buffer("inv_freq", inv_freq.to(torch.get_default_device()), persistent=False)

    def angles(self, length: int, device: torch.device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of positions start .. start + length - 1, (T, D/2) each."""
        t = torch.arange(start, start + length, dtype=torch.float32, device=device)
        freqs = torch.outer(t, self.inv_freq.to(device))  # (T, D/2)
        return freqs.cos(), freqs.sin()

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D); cos, sin: (T, D/2)."""
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        return out.type_as(x)
