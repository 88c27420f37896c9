"""What every task hands the trainer: batches of (inputs, targets) and an evaluation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Iterable, Protocol

import torch

IGNORE_INDEX = -100  # targets with this value add nothing to the loss (prompt and padding)
PAD = 0  # input token used to right-pad shorter sequences


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) next-token ids, IGNORE_INDEX where nothing is predicted
    sources: torch.Tensor | None = None  # (B, S) the encoder's input (encoder-decoder only)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, rows: slice) -> "Batch":
        return Batch(self.inputs[rows], self.targets[rows],
                     None if self.sources is None else self.sources[rows])

    def model_args(self) -> tuple[torch.Tensor, ...]:
        """What the model reads: ``model(*batch.model_args())``."""
        return (self.inputs,) if self.sources is None else (self.inputs, self.sources)

    def split(self, size: int) -> list["Batch"]:
        return [self[i:i + size] for i in range(0, len(self), size)]

    def to(self, device: torch.device) -> "Batch":
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None or device.type != "cuda":
                return None if tensor is None else tensor.to(device)
            # From page-locked memory the copy runs alongside the GPU's work instead of before it.
            return tensor.pin_memory().to(device, non_blocking=True)

        return Batch(move(self.inputs), move(self.targets), move(self.sources))

    @cached_property
    def n_targets(self) -> int:
        """Target tokens that count towards the loss (counted once per batch)."""
        return int((self.targets != IGNORE_INDEX).sum())


def collate(pairs: list[tuple[list[int], list[int]]]) -> Batch:
    """Right-pad (inputs, targets) pairs of different lengths into one batch. In a causal model
    padding at the end can never influence the real positions before it."""
    length = max(len(inputs) for inputs, _ in pairs)
    inputs = torch.full((len(pairs), length), PAD, dtype=torch.long)
    targets = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
    for row, (x, y) in enumerate(pairs):
        inputs[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        targets[row, : len(y)] = torch.tensor(y, dtype=torch.long)
    return Batch(inputs, targets)


def collate_seq2seq(triples: list[tuple[list[int], list[int], list[int]]]) -> Batch:
    """(source, decoder inputs, targets) triples: sources and targets right-padded apart."""
    batch = collate([(inputs, targets) for _, inputs, targets in triples])
    sources = torch.full((len(triples), max(len(s) for s, _, _ in triples)), PAD, dtype=torch.long)
    for row, (source, _, _) in enumerate(triples):
        sources[row, : len(source)] = torch.tensor(source, dtype=torch.long)
    batch.sources = sources
    return batch


Forward = Callable[..., torch.Tensor]  # forward(*batch.model_args()) -> logits (B, T, V)
Sums = dict[str, float]  # what a batch adds to an evaluation: losses and counts, by name


@dataclass
class Evaluation:
    """A task's evaluation as data: its held-out batches, what each batch adds up to, and the
    metrics from the totals. Sums add up in any grouping, so a strategy may score each rank's
    share of the batches and add up the ranks' scores (``Strategy.evaluate``). Called with a
    forward, it scores every batch in this process: one process's evaluation."""

    n_batches: int
    batch: Callable[[int], Batch]  # the i-th held-out batch: the same on every rank
    score: Callable[[Forward, Batch], Sums]  # one batch's sums, under the names in ``totals``
    finish: Callable[[Sums], dict[str, float]]  # the metrics from the sums over all batches
    totals: tuple[str, ...]  # the names of the sums

    def score_table(self, forward: Forward, which: Iterable[int]) -> torch.Tensor:
        """(n_batches, len(totals)) float64: the sums of the batches ``which``, zero elsewhere.
        Kept batch by batch, so that ranks that each fill their own rows add up their tables
        exactly (x + 0 is x)."""
        table = torch.zeros(self.n_batches, len(self.totals), dtype=torch.float64)
        for i in which:
            sums = self.score(forward, self.batch(i))
            table[i] = torch.tensor([float(sums[name]) for name in self.totals], dtype=torch.float64)
        return table

    def result(self, table: torch.Tensor) -> dict[str, float]:
        """The metrics from every batch's sums (a ``score_table`` of all the batches). Each
        total is rounded once (fsum), so it is the same whoever scored which batch, in
        whatever order."""
        return self.finish({name: math.fsum(column) for name, column in zip(self.totals, table.T.tolist())})

    def __call__(self, forward: Forward) -> dict[str, float]:
        return self.result(self.score_table(forward, range(self.n_batches)))


class Codec(Protocol):
    """Text <-> token ids, for prompts and generations (a text task's tokenizer)."""

    end_of_text: int | None  # a generation stops at this token

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def state(self) -> dict:
        """What rebuilds the codec without the data (kept in checkpoints)."""


@dataclass
class Sampling:
    """Generations written to samples.txt at every evaluation."""

    prompts: list[str]
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None


class Task(Protocol):
    vocab_size: int
    max_seq_len: int  # the longest input the task will ever feed the model
    codec: Codec
    sampling: Sampling | None  # None: no samples.txt
    main_metric: tuple[str, str]  # what early stopping watches: (a key of evaluate's, "min" | "max")

    def describe(self) -> str: ...

    def train_batch(self, step: int, batch_size: int) -> Batch:
        """The global batch of a step: a pure function of the run's seed and the step, so a
        resumed run reads exactly the data an uninterrupted one would have."""

    def evaluation(self, batch_size: int) -> Evaluation:
        """The held-out set in batches of ``batch_size`` (or fewer rows, where the task's
        memory bound says so) and how to score them."""

    def evaluate(self, forward: Forward, batch_size: int) -> dict[str, float]:
        """One process's evaluation: ``self.evaluation(batch_size)(forward)``."""
