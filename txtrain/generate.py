"""Decoding from a trained model, one token at a time."""

from __future__ import annotations

from typing import Callable

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


NextLogits = Callable[[torch.Tensor], torch.Tensor]  # inputs (1, T) -> next-token logits (1, V)


@torch.no_grad()
def draw_tokens(next_logits: NextLogits, prompt: list[int], max_new_tokens: int,
                temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None, context: int | None = None,
                stop: int | None = None) -> list[int]:
    """Continue ``prompt`` one token at a time: softmax(logits / temperature) over the ``top_k``
    likeliest tokens (temperature 0: the likeliest). The model sees at most the last ``context``
    tokens. Stops early at ``stop``, which is not returned. The draw happens on the CPU with
    ``generator``, so a seed gives the same text on any device."""
    ids, new = list(prompt), []
    for _ in range(max_new_tokens):
        window = ids[-context:] if context else ids
        logits = next_logits(torch.tensor([window], dtype=torch.long))[0].float().cpu()
        token = pick(logits, temperature, top_k, generator)
        if token == stop:
            break
        ids.append(token)
        new.append(token)
    return new


def pick(logits: torch.Tensor, temperature: float, top_k: int | None,
         generator: torch.Generator | None) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth_best = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def complete(next_logits: NextLogits, codec, prompt: str, sampling, seed: int,
             context: int | None = None) -> str:
    """``prompt`` and its continuation as text, drawn with its own generator (seeded from
    ``seed``), so sampling never moves the training's random streams."""
    generator = torch.Generator().manual_seed(seed)
    new = draw_tokens(next_logits, codec.encode(prompt), sampling.max_new_tokens, sampling.temperature,
                      sampling.top_k, generator, context, stop=codec.end_of_text)
    return codec.decode(new)
