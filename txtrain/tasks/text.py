"""Language modelling on a text corpus: predict every next token of random windows.

The tokens come from ``task.data.path`` (``token_data.py``): text, tokenized once into the
cache, or a folder of prepared shards. Where the data has no validation split of its own, the
last ``val_fraction`` of the tokens is held out for validation, the rest is training data.
A training batch is ``batch_size`` windows at random offsets into all the training tokens,
``inputs = tokens[i : i+T]`` and ``targets = tokens[i+1 : i+T+1]``; the offsets are a pure
function of the seed and the step, so a resumed run reads exactly the same data, on any
number of ranks.
Validation reads the held-out tokens as consecutive windows and reports the mean loss per
token and its exponential, the perplexity.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from txtrain.config import ConfigError, TextTaskConfig
from txtrain.model.chunked_loss import TokenLoss, evaluation_loss
from txtrain.tasks.base import Batch, Evaluation, Forward, Sampling, Sums
from txtrain.tasks.corpus import find_corpus
from txtrain.tasks.shards import TokenStream
from txtrain.tasks.token_cache import cached_tokens
from txtrain.tasks.token_data import TokenData, is_token_folder, open_token_folder

# Logits per evaluation batch, where they exist (the model computes its loss chunk by chunk, but
# a pipeline's evaluation, or a forward that gives logits, holds them): rows are chosen so
# that (rows, T, V) floats stay near 256 MiB.
EVAL_LOGITS_BUDGET = 1 << 26


class TextTask:
    main_metric = ("val_loss", "min")  # what train.patience watches: (evaluate's key, up or down)
    totals = ("loss_sum", "tokens")  # what each validation batch adds up (score)

    def __init__(self, cfg: TextTaskConfig, seed: int, progress: bool = True):
        self.cfg = cfg
        self.seed = seed
        self.data = open_data(cfg, progress)
        self.codec = self.data.codec
        self.vocab_size = self.codec.vocab_size
        self.max_seq_len = cfg.seq_len
        self.train_tokens, self.val_tokens = split(self.data, cfg)
        self.sampling = (Sampling(list(cfg.prompts), cfg.sample_tokens, cfg.temperature, cfg.top_k)
                         if cfg.prompts and cfg.sample_tokens > 0 else None)

    def describe(self) -> str:
        return (f"task {self.cfg.name}: {self.data.what}, "
                f"tokenizer {self.codec.name} (vocabulary {self.vocab_size:,}), "
                f"{len(self.train_tokens):,} training / {len(self.val_tokens):,} validation tokens, "
                f"windows of {self.cfg.seq_len}")

    def train_batch(self, step: int, batch_size: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.train_tokens) - self.cfg.seq_len, size=batch_size)
        return self.windows(self.train_tokens, starts)

    def windows(self, tokens: TokenStream, starts: np.ndarray) -> Batch:
        rows = tokens.windows(starts, self.cfg.seq_len + 1)
        if tokens.max_id >= self.vocab_size and len(rows) and rows.max() >= self.vocab_size:
            raise ConfigError(f"the data at {self.cfg.data.path} holds token id {int(rows.max())}, beyond "
                              f"the vocabulary of {self.vocab_size:,} ({self.codec.name}): was it made "
                              "with another tokenizer?")
        rows = torch.from_numpy(rows)
        return Batch(rows[:, :-1], rows[:, 1:])

    def val_starts(self) -> np.ndarray:
        """Consecutive, non-overlapping windows over the held-out tokens (or their beginning,
        up to task.eval_tokens)."""
        usable = len(self.val_tokens) - 1
        if self.cfg.eval_tokens is not None:
            usable = min(usable, max(self.cfg.eval_tokens, self.cfg.seq_len))
        return np.arange(usable // self.cfg.seq_len) * self.cfg.seq_len

    def evaluation(self, batch_size: int) -> Evaluation:
        """The held-out windows in batches of ``batch_size`` (fewer rows where their logits
        would outgrow EVAL_LOGITS_BUDGET), each read when it is scored."""
        rows = max(1, min(batch_size, EVAL_LOGITS_BUDGET // (self.cfg.seq_len * self.vocab_size)))
        starts = self.val_starts()
        batches = [starts[first:first + rows] for first in range(0, len(starts), rows)]
        return Evaluation(len(batches), lambda i: self.validation_batch(batches[i]), self.score,
                          self.finish, self.totals)

    def evaluate(self, forward: Forward, batch_size: int) -> dict[str, float]:
        return self.evaluation(batch_size)(forward)

    def validation_batch(self, starts: np.ndarray) -> Batch:
        """The held-out windows that begin at ``starts``."""
        return self.windows(self.val_tokens, starts)

    @torch.no_grad()
    def score(self, forward: Forward, batch: Batch) -> Sums:
        # The model's own loss: its head, chunk by chunk, never the whole logits
        loss = evaluation_loss(forward, batch.model_args(), batch.targets, TokenLoss())
        return {"loss_sum": float(loss), "tokens": batch.targets.numel()}

    @staticmethod
    def finish(sums: Sums) -> dict[str, float]:
        val_loss = sums["loss_sum"] / sums["tokens"]
        return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 700.0))}


def open_data(cfg: TextTaskConfig, progress: bool) -> TokenData:
    path = Path(cfg.data.path).expanduser() if cfg.data.path else None
    if path is not None and is_token_folder(path):
        return open_token_folder(path, cfg)
    if path is not None and path.suffix == ".bin":
        raise ConfigError(f"task.data.path={path} is a file of tokens: point it at the folder of shards "
                          "(or nanoGPT's folder with train.bin)")
    corpus = find_corpus(cfg.data, cfg.cache_dir)
    data = open_token_folder(cached_tokens(corpus, cfg, progress), cfg)
    data.what = f"{len(corpus.files)} file(s) at {corpus.root}"
    return data


def split(data: TokenData, cfg: TextTaskConfig) -> tuple[TokenStream, TokenStream]:
    """Training and validation tokens: the data's own split, else the end held out."""
    window = cfg.seq_len + 1  # inputs and targets, shifted by one
    tokens = data.train
    if data.val is not None:
        if len(tokens) < window or len(data.val) < window:
            raise ConfigError(f"{data.what} holds {len(tokens):,} training and {len(data.val):,} validation "
                              f"tokens: too few for a window of task.seq_len={cfg.seq_len} in each")
        return tokens, data.val
    n_val = max(window, int(len(tokens) * cfg.val_fraction))
    if len(tokens) < n_val + window:
        raise ConfigError(f"the corpus has {len(tokens):,} tokens: too few for a training and a "
                          f"validation window of task.seq_len={cfg.seq_len} (needs {n_val + window:,}); "
                          "use a longer corpus or a shorter task.seq_len")
    return tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val:]
