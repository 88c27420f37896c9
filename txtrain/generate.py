"""Decoding from a trained model, one token at a time.

Sampling reads the next token's logits from a *stepper*, handed the new tokens at each step.
``Window`` reruns the model over the last ``context`` tokens at every step; ``Cached`` keeps
the keys and values of the positions already read (model/attention.py's ``KVCache``), so a
step costs one position. Both draw the same tokens: past the context the cache falls back to
``Window``'s rerun (see ``Cached``). The cache needs the model itself (a ``ModelLogits``);
other next-token functions (a pipeline's) step through ``Window``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from txtrain.model.attention import KVCache

NextLogits = Callable[[torch.Tensor], torch.Tensor]  # inputs (1, T) -> next-token logits (1, V)


class ModelLogits:
    """The next-token logits of a model run whole in this process: a NextLogits that can also
    keep a key/value cache, ``next_logits(inputs, cache)`` (the model's ``cache`` argument).

    ``sources``: the encoder-decoder's source (1, S), the same at every step. ``share``: applied to
    the logits (a strategy makes every rank draw from rank 0's). ``with_cache``: sample with a
    KVCache where the model takes one (``takes_cache``); False reruns the window every step."""

    def __init__(self, model: nn.Module, device: torch.device | str, sources: torch.Tensor | None = None,
                 share: Callable[[torch.Tensor], torch.Tensor] | None = None, with_cache: bool = True):
        self.model, self.device, self.share = model, device, share
        self.with_cache = with_cache and takes_cache(model)
        self.sources = None if sources is None else sources.to(device)

    def __call__(self, inputs: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        args = (inputs.to(self.device),) if self.sources is None else (inputs.to(self.device), self.sources)
        # A model without a cache takes no cache argument at all.
        logits = self.model(*args, last_only=True, **({} if cache is None else {"cache": cache}))
        return logits if self.share is None else self.share(logits)


class Window:
    """Without a cache: every step reruns the model over the last ``context`` tokens (all of
    them when ``context`` is None)."""

    def __init__(self, next_logits: NextLogits, context: int | None = None):
        self.next_logits, self.context = next_logits, context
        self.ids: list[int] = []

    def __call__(self, new: list[int]) -> torch.Tensor:
        """Reads ``new``, the tokens after those read so far; the next token's logits (V,)."""
        self.ids += new
        window = self.ids[-self.context:] if self.context else self.ids
        return self.next_logits(torch.tensor([window], dtype=torch.long))[0]


class Cached(Window):
    """With a key/value cache: every step runs the model on the new tokens only.

    Once the sequence outgrows ``context``, its oldest token must leave the window, and a
    cache cannot forget it: every later key and value was computed attending to it, at
    positions that now all shift by one. From then on each step reruns the window, as
    ``Window`` does, so the tokens are the same with the cache or without."""

    def __init__(self, next_logits: ModelLogits, context: int | None = None):
        super().__init__(next_logits, context)
        self.cache: KVCache | None = KVCache()

    def __call__(self, new: list[int]) -> torch.Tensor:
        if self.cache is None or (self.context and len(self.ids) + len(new) > self.context):
            self.cache = None  # the window slides from here on
            return super().__call__(new)
        self.ids += new
        return self.next_logits(torch.tensor([new], dtype=torch.long), self.cache)[0]


def takes_cache(model: nn.Module) -> bool:
    """Whether the model, inside any wrappers (DDP's, DataParallel's ``module``), takes a
    KVCache (``LanguageModel.takes_cache``)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return getattr(model, "takes_cache", False)


def stepper(next_logits: NextLogits, context: int | None = None) -> Window:
    """``Cached`` where ``next_logits`` keeps a cache, else ``Window``."""
    if isinstance(next_logits, ModelLogits) and next_logits.with_cache:
        return Cached(next_logits, context)
    return Window(next_logits, context)


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Extend equal-length prompts (B, P) by the argmax token, ``max_new_tokens`` times, with
    a key/value cache where the model takes one. Returns only the new tokens, (B, max_new_tokens)."""
    cache = KVCache() if takes_cache(model) else None
    sequence, new = prompts, prompts
    for _ in range(max_new_tokens):
        logits = model(sequence)[:, -1] if cache is None else model(new, last_only=True, cache=cache)
        new = logits.argmax(dim=-1, keepdim=True)
        sequence = torch.cat([sequence, new], dim=1)
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


@torch.no_grad()
def draw_tokens(next_logits: NextLogits, prompt: list[int], max_new_tokens: int,
                temperature: float = 1.0, top_k: int | None = None,
                generator: torch.Generator | None = None, context: int | None = None,
                stop: int | None = None) -> list[int]:
    """Continue ``prompt`` one token at a time: softmax(logits / temperature) over the ``top_k``
    likeliest tokens (temperature 0: the likeliest). The model sees at most the last ``context``
    tokens, through a key/value cache where ``next_logits`` keeps one (``stepper``). Stops
    early at ``stop``, which is not returned. The draw happens on the CPU with ``generator``,
    so a seed gives the same text on any device."""
    step, new, feed = stepper(next_logits, context), [], list(prompt)
    for _ in range(max_new_tokens):
        token = pick(step(feed).float().cpu(), temperature, top_k, generator)
        if token == stop:
            break
        new.append(token)
        feed = [token]
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


def draw_text(next_logits: NextLogits, codec, start: list[int], sampling, seed: int,
              context: int | None = None) -> str:
    """The text of the tokens drawn after ``start``, with a generator of its own (seeded from
    ``seed``), so sampling never moves the training's random streams."""
    generator = torch.Generator().manual_seed(seed)
    new = draw_tokens(next_logits, start, sampling.max_new_tokens, sampling.temperature,
                      sampling.top_k, generator, context, stop=codec.end_of_text)
    return codec.decode(new)


def complete(next_logits: NextLogits, codec, prompt: str, sampling, seed: int,
             context: int | None = None) -> str:
    """The continuation of ``prompt`` as text (see ``draw_text``)."""
    return draw_text(next_logits, codec, codec.encode(prompt), sampling, seed, context)
