"""Copy, reverse and fibonacci: sequences generated on the fly from a seed.

A sequence is ``prompt SEP answer EOS``. The GPT reads it shifted by one and is scored only
on the answer (and EOS): prompt positions carry IGNORE_INDEX in the targets. The encoder-decoder
(``seq2seq``) reads ``prompt SEP`` as its source, and its decoder reads ``SEP answer`` (SEP
standing in for a start token) to predict ``answer EOS``. A fixed held-out set is drawn once from
its own stream; training never produces one of its prompts.
"""

from __future__ import annotations

import functools
import random

import torch

from txtrain.config import ConfigError, SyntheticTaskConfig
from txtrain.model.chunked_loss import TokenLoss, evaluation_loss
from txtrain.tasks.base import (IGNORE_INDEX, Batch, Evaluation, Forward, Sums, collate,
                                collate_seq2seq)

SEP, EOS = 1, 2  # 0 is padding
FIRST_SYMBOL = 3
HELD_OUT_SEED = "held-out"  # the held-out set is the same for every run seed


class SyntheticTask:
    main_metric = ("exact_match", "max")  # what train.patience watches: (evaluate's key, up or down)
    totals = ("correct", "sequences", "loss_sum", "tokens")  # what each held-out batch adds up (score)

    def __init__(self, cfg: SyntheticTaskConfig, seed: int, seq2seq: bool = False):
        self.cfg = cfg
        self.seed = seed
        self.seq2seq = seq2seq
        self.collate = collate_seq2seq if seq2seq else collate
        self.kind = str(cfg.name)
        if self.kind == "fibonacci":
            self.width = len(str(cfg.modulus - 1))  # every term is written with this many digits
            self.comma = FIRST_SYMBOL + 10
            self.semicolon = FIRST_SYMBOL + 11
            self.vocab_size = FIRST_SYMBOL + 12
        else:
            self.vocab_size = FIRST_SYMBOL + cfg.n_symbols
        longest = self.draw_prompt(random.Random(0), max(cfg.max_len, cfg.eval_lengths[1]))
        self.max_seq_len = (max(len(longest), len(self.answer(longest))) if seq2seq
                            else len(self.sequence(longest)) - 1)
        self.held_out = self.make_held_out()
        self.held_out_prompts = {tuple(p) for p in self.held_out}
        self.codec = SyntheticCodec(self)
        self.sampling = None  # exact match says it all; `txtrain-sample` shows answers

    def describe(self) -> str:
        lo, hi = self.cfg.min_len, self.cfg.max_len
        return (f"task {self.kind}: lengths {lo}..{hi}, vocabulary {self.vocab_size}, "
                f"{len(self.held_out)} held-out sequences")

    # --- one example ------------------------------------------------------------------------
    def draw_prompt(self, rng: random.Random, length: int) -> list[int]:
        """Prompt tokens up to and including SEP."""
        if self.kind == "fibonacci":  # "count ; a , b SEP": terms then sit at a fixed stride
            a, b = rng.randrange(self.cfg.modulus), rng.randrange(self.cfg.modulus)
            count = [FIRST_SYMBOL + int(d) for d in str(length)]
            return count + [self.semicolon] + self.number(a) + [self.comma] + self.number(b) + [SEP]
        return [FIRST_SYMBOL + rng.randrange(self.cfg.n_symbols) for _ in range(length)] + [SEP]

    def answer(self, prompt: list[int]) -> list[int]:
        """The tokens the model must produce after the prompt, EOS included."""
        if self.kind == "copy":
            return prompt[:-1] + [EOS]
        if self.kind == "reverse":
            return prompt[-2::-1] + [EOS]
        w, start = self.width, prompt.index(self.semicolon) + 1
        count = int("".join(str(t - FIRST_SYMBOL) for t in prompt[: start - 1]))
        a = self.read_number(prompt[start: start + w])
        b = self.read_number(prompt[start + w + 1: start + 2 * w + 1])
        out: list[int] = []
        for _ in range(count):
            a, b = b, (a + b) % self.cfg.modulus
            out += self.number(b) + [self.comma]
        return out[:-1] + [EOS]

    def number(self, value: int) -> list[int]:
        digits = str(value).zfill(self.width)
        if self.cfg.lsb_first:
            digits = digits[::-1]
        return [FIRST_SYMBOL + int(d) for d in digits]

    def read_number(self, tokens: list[int]) -> int:
        digits = "".join(str(t - FIRST_SYMBOL) for t in tokens)
        return int(digits[::-1] if self.cfg.lsb_first else digits)

    def sequence(self, prompt: list[int]) -> list[int]:
        return prompt + self.answer(prompt)

    def example(self, prompt: list[int]) -> tuple[list[int], ...]:
        """(inputs, targets): targets are inputs shifted by one, prompt positions ignored.
        Under seq2seq, (source, decoder inputs, targets)."""
        answer = self.answer(prompt)
        if self.seq2seq:
            return prompt, [SEP] + answer[:-1], answer
        inputs = (prompt + answer)[:-1]
        targets = [IGNORE_INDEX] * (len(prompt) - 1) + answer
        return inputs, targets

    # --- data sets --------------------------------------------------------------------------
    def prompt_space(self, length: int) -> int:
        return self.cfg.modulus ** 2 if self.kind == "fibonacci" else self.cfg.n_symbols ** length

    def make_held_out(self) -> list[list[int]]:
        """n_eval distinct prompts, lengths uniform over the eval range. At most half of the
        prompts of any one length are held out, so training always has the other half."""
        lo, hi = self.cfg.eval_lengths
        quota = {n: self.prompt_space(n) // 2 for n in range(lo, hi + 1)}
        if sum(quota.values()) < self.cfg.n_eval:
            raise ConfigError(f"task.n_eval={self.cfg.n_eval} is more than half of all distinct "
                              f"prompts of lengths {lo}..{hi}; lower task.n_eval or widen the lengths")
        rng = random.Random(HELD_OUT_SEED)
        chosen: dict[tuple[int, ...], None] = {}
        while len(chosen) < self.cfg.n_eval:
            length = rng.randint(lo, hi)
            if quota[length] == 0:
                continue
            prompt = tuple(self.draw_prompt(rng, length))
            if prompt not in chosen:
                chosen[prompt] = None
                quota[length] -= 1
        return [list(p) for p in chosen]

    def train_batch(self, step: int, batch_size: int) -> Batch:
        rng = random.Random(f"{self.seed}:{step}")
        examples = []
        for _ in range(batch_size):
            length = rng.randint(self.cfg.min_len, self.cfg.max_len)
            prompt = self.draw_prompt(rng, length)
            while tuple(prompt) in self.held_out_prompts:
                prompt = self.draw_prompt(rng, length)
            examples.append(self.example(prompt))
        return self.collate(examples)

    @functools.cache
    def held_out_batches(self, batch_size: int) -> list[Batch]:
        """The held-out set in batches of similar length (little padding); built once."""
        examples = sorted((self.example(p) for p in self.held_out), key=lambda e: len(e[0]))
        return [self.collate(examples[i:i + batch_size]) for i in range(0, len(examples), batch_size)]

    # --- evaluation -------------------------------------------------------------------------
    def evaluation(self, batch_size: int) -> Evaluation:
        batches = self.held_out_batches(batch_size)
        return Evaluation(len(batches), batches.__getitem__, self.score, self.finish, self.totals)

    def evaluate(self, forward: Forward, batch_size: int) -> dict[str, float]:
        return self.evaluation(batch_size)(forward)

    @torch.no_grad()
    def score(self, forward: Forward, batch: Batch) -> Sums:
        """Exact match of greedy decoding, computed in one teacher-forced pass per batch.

        Greedy decoding reproduces the answer exactly if and only if, at every answer
        position, the argmax given the correct prefix is the correct token: up to the first
        mistake the greedy prefix *is* the correct prefix. So checking every argmax under
        teacher forcing gives the same verdict as decoding token by token, in one pass.
        (``txtrain.generate.greedy_exact_match`` decodes for real; a test checks they agree.)
        """
        # The model's own loss and per-token argmax == target, through its head chunk by chunk
        loss, hits = evaluation_loss(forward, batch.model_args(), batch.targets,
                                     TokenLoss(ignore_index=IGNORE_INDEX, hits=True))
        scored = (batch.targets != IGNORE_INDEX).to(hits.device)
        hits = hits.view(scored.shape) | ~scored
        return {"correct": int(hits.all(dim=1).sum()), "sequences": len(batch),
                "loss_sum": float(loss), "tokens": int(scored.sum())}

    @staticmethod
    def finish(sums: Sums) -> dict[str, float]:
        return {"exact_match": sums["correct"] / sums["sequences"],
                "eval_loss": sums["loss_sum"] / sums["tokens"]}


class SyntheticCodec:
    """Prompts and answers as people write them: ``3 1 4`` for copy and reverse (symbols are
    numbers 0..n_symbols-1); ``5: 12, 34`` for fibonacci (how many terms: the first two)."""

    end_of_text = EOS

    def __init__(self, task: SyntheticTask):
        self.task = task

    def encode(self, text: str) -> list[int]:
        task = self.task
        try:
            if task.kind == "fibonacci":
                count, _, seeds = text.partition(":")
                a, b = (int(v) for v in seeds.split(","))
                length = int(count)
                if not (0 <= a < task.cfg.modulus and 0 <= b < task.cfg.modulus and length > 0):
                    raise ValueError
                return ([FIRST_SYMBOL + int(d) for d in str(length)] + [task.semicolon]
                        + task.number(a) + [task.comma] + task.number(b) + [SEP])
            symbols = [int(v) for v in text.replace(",", " ").split()]
            if not symbols or not all(0 <= v < task.cfg.n_symbols for v in symbols):
                raise ValueError
            return [FIRST_SYMBOL + v for v in symbols] + [SEP]
        except ValueError:
            shape = ("'COUNT: A, B' (e.g. '5: 12, 34'), terms below "
                     f"{task.cfg.modulus}" if task.kind == "fibonacci" else
                     f"symbols 0..{task.cfg.n_symbols - 1} separated by spaces (e.g. '3 1 4')")
            raise ValueError(f"a {task.kind} prompt is {shape}, not {text!r}") from None

    def decode(self, ids: list[int]) -> str:
        task = self.task
        if task.kind != "fibonacci":
            return " ".join(str(t - FIRST_SYMBOL) if t >= FIRST_SYMBOL else "?" for t in ids)
        terms, digits = [], []
        for t in ids + [task.comma]:
            if t == task.comma:
                terms.append(str(task.read_number(digits)) if digits else "?")
                digits = []
            else:
                digits.append(t)
        return ", ".join(terms)

    def state(self) -> dict:
        return {"kind": "synthetic", "config": {k: str(v) if k == "name" else v
                                                for k, v in vars(self.task.cfg).items()}}
