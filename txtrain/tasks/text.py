"""Language modelling on a text corpus: predict every next token of random windows.

The token stream is split once: the last ``val_fraction`` of it is held out for validation,
the rest is training data. A training batch is ``batch_size`` windows at random offsets,
``inputs = tokens[i : i+T]`` and ``targets = tokens[i+1 : i+T+1]``; the offsets are a pure
function of the seed and the step, so a resumed run reads exactly the same data.
Validation reads the held-out tokens as consecutive windows and reports the mean loss per
token and its exponential, the perplexity.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from txtrain.config import ConfigError, TextTaskConfig
from txtrain.tasks.base import Batch, Forward, Sampling
from txtrain.tasks.corpus import find_corpus
from txtrain.tasks.token_cache import load_tokens

# Logits per evaluation batch: rows are chosen so that (rows, T, V) floats stay near 256 MiB.
EVAL_LOGITS_BUDGET = 1 << 26


class TextTask:
    def __init__(self, cfg: TextTaskConfig, seed: int, progress: bool = True):
        self.cfg = cfg
        self.seed = seed
        self.corpus = find_corpus(cfg.data, cfg.cache_dir)
        tokens, self.codec = load_tokens(self.corpus, cfg, progress)
        self.vocab_size = self.codec.vocab_size
        self.max_seq_len = cfg.seq_len
        window = cfg.seq_len + 1  # inputs and targets, shifted by one
        n_val = max(window, int(len(tokens) * cfg.val_fraction))
        if len(tokens) < n_val + window:
            raise ConfigError(f"the corpus has {len(tokens):,} tokens: too few for a training and a "
                              f"validation window of task.seq_len={cfg.seq_len} (needs {n_val + window:,}); "
                              "use a longer corpus or a shorter task.seq_len")
        self.train_tokens = tokens[: len(tokens) - n_val]
        self.val_tokens = tokens[len(tokens) - n_val:]
        self.sampling = (Sampling(list(cfg.prompts), cfg.sample_tokens, cfg.temperature, cfg.top_k)
                         if cfg.prompts and cfg.sample_tokens > 0 else None)

    def describe(self) -> str:
        return (f"task {self.cfg.name}: {len(self.corpus.files)} file(s) at {self.corpus.root}, "
                f"tokenizer {self.codec.name} (vocabulary {self.vocab_size:,}), "
                f"{len(self.train_tokens):,} training / {len(self.val_tokens):,} validation tokens, "
                f"windows of {self.cfg.seq_len}")

    def train_batch(self, step: int, batch_size: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.train_tokens) - self.cfg.seq_len, size=batch_size)
        return self.windows(self.train_tokens, starts)

    def windows(self, tokens: np.ndarray, starts: np.ndarray) -> Batch:
        offsets = starts[:, None] + np.arange(self.cfg.seq_len + 1)
        rows = torch.from_numpy(tokens[offsets].astype(np.int64))
        return Batch(rows[:, :-1], rows[:, 1:])

    def val_starts(self) -> np.ndarray:
        """Consecutive, non-overlapping windows over the held-out tokens (or their beginning,
        up to task.eval_tokens)."""
        usable = len(self.val_tokens) - 1
        if self.cfg.eval_tokens is not None:
            usable = min(usable, max(self.cfg.eval_tokens, self.cfg.seq_len))
        return np.arange(usable // self.cfg.seq_len) * self.cfg.seq_len

    @torch.no_grad()
    def evaluate(self, forward: Forward, batch_size: int) -> dict[str, float]:
        rows = max(1, min(batch_size, EVAL_LOGITS_BUDGET // (self.cfg.seq_len * self.vocab_size)))
        starts = self.val_starts()
        loss_sum, n_tokens = 0.0, 0
        for first in range(0, len(starts), rows):
            batch = self.windows(self.val_tokens, starts[first:first + rows])
            logits = forward(*batch.model_args())
            targets = batch.targets.to(logits.device)
            loss_sum += float(F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                              reduction="sum"))
            n_tokens += targets.numel()
        val_loss = loss_sum / n_tokens
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 700.0))}
