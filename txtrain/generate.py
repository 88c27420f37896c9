"""Decoding from a trained model, one token at a time."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Extend equal-length prompts (B, P) by the argmax token, ``max_new_tokens`` times.
    Returns only the new tokens, (B, max_new_tokens)."""
    sequence = prompts
    for _ in range(max_new_tokens):
        next_token = model(sequence)[:, -1].argmax(dim=-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    return sequence[:, prompts.shape[1]:]


@torch.no_grad()
def greedy_exact_match(model: nn.Module, prompts: list[list[int]], answers: list[list[int]],
                       device: torch.device | str = "cpu") -> float:
    """Fraction of prompts whose greedy continuation starts with the whole answer (which ends
    in EOS, so stopping at the right place is part of being right)."""
    by_length: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).append(i)
    correct = 0
    for rows in by_length.values():
        batch = torch.tensor([prompts[i] for i in rows], device=device)
        longest = max(len(answers[i]) for i in rows)
        generated = greedy_decode(model, batch, longest).tolist()
        correct += sum(generated[k][: len(answers[i])] == answers[i] for k, i in enumerate(rows))
    return correct / len(prompts)
