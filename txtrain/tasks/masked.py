"""Masked-language modelling (BERT's objective) on a text corpus, for ``model.arch=encoder``.

A training example is a window of ``seq_len`` tokens, read as the text task reads them. In
each window ``task.mask_fraction`` of the positions (15%) are chosen; of those, 80% are
replaced by the mask token, 10% by a random token and 10% left as they are, so the model
cannot tell which unchanged tokens it will be asked about. The loss covers the chosen positions
only: their targets are the original tokens, every other target is IGNORE_INDEX.

Everything is drawn from the seed and the step (training) or the window (validation), so a
batch is the same on any number of ranks and a resumed run reads the same masks. Validation
masks the held-out windows the same way at every evaluation and reports the loss and the top-1
accuracy at the chosen positions (``mlm_accuracy``).
"""

from __future__ import annotations

import numpy as np
import torch

from txtrain.config import TextTaskConfig
from txtrain.model.chunked_loss import TokenLoss, evaluation_loss
from txtrain.tasks.base import IGNORE_INDEX, Batch, Forward, Sums
from txtrain.tasks.text import TextTask
from txtrain.tasks.tokenizers import MaskedTokenizer

REPLACE_WITH_MASK, REPLACE_WITH_RANDOM = 0.8, 0.1  # of the chosen positions; the rest stay
VALIDATION_STREAM = 1  # keeps validation's draws apart from every training step's


class MaskedTextTask(TextTask):
    totals = ("loss_sum", "correct", "chosen")  # what each validation batch adds up (score)

    def __init__(self, cfg: TextTaskConfig, seed: int, progress: bool = True):
        super().__init__(cfg, seed, progress)
        self.codec = MaskedTokenizer(self.data.codec)
        self.vocab_size = self.codec.vocab_size
        self.sampling = None  # an encoder does not continue text; txtrain-sample fills masks

    def describe(self) -> str:
        return (super().describe() + f"; masked-language modelling: {self.cfg.mask_fraction:.0%} "
                f"of positions chosen, {self.codec.spelling} is id {self.codec.mask_id}")

    def train_batch(self, step: int, batch_size: int) -> Batch:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, len(self.train_tokens) - self.cfg.seq_len, size=batch_size)
        return self.mask(self.windows(self.train_tokens, starts).inputs, rng)

    def mask(self, tokens: torch.Tensor, rng: np.random.Generator) -> Batch:
        """Choose ``mask_fraction`` of each row's positions and corrupt them (80/10/10)."""
        rows, length = tokens.shape
        n_chosen = max(1, round(self.cfg.mask_fraction * length))
        order = np.argsort(rng.random((rows, length)), axis=1)  # a random permutation per row
        chosen = np.zeros((rows, length), dtype=bool)
        np.put_along_axis(chosen, order[:, :n_chosen], True, axis=1)
        action = rng.random((rows, length))
        to_mask = chosen & (action < REPLACE_WITH_MASK)
        to_random = chosen & (action >= REPLACE_WITH_MASK) & (action < REPLACE_WITH_MASK + REPLACE_WITH_RANDOM)
        random_tokens = rng.integers(0, self.codec.mask_id, size=(rows, length))  # never the mask

        inputs = tokens.numpy().copy()
        inputs[to_mask] = self.codec.mask_id
        inputs[to_random] = random_tokens[to_random]
        targets = np.where(chosen, tokens.numpy(), IGNORE_INDEX)
        return Batch(torch.from_numpy(inputs), torch.from_numpy(targets))

    def validation_batch(self, starts: np.ndarray) -> Batch:
        """Held-out windows, each masked by a draw of its own: the same at every evaluation,
        however the windows are batched."""
        tokens = self.windows(self.val_tokens, starts).inputs
        rows = [self.mask(tokens[i:i + 1], np.random.default_rng([self.seed, VALIDATION_STREAM, int(start)]))
                for i, start in enumerate(starts)]
        return Batch(torch.cat([row.inputs for row in rows]), torch.cat([row.targets for row in rows]))

    @torch.no_grad()
    def score(self, forward: Forward, batch: Batch) -> Sums:
        # The model's own loss over the chosen tokens (the others are ignored), and whether
        # each token's argmax is its target, chunk by chunk: never the whole logits
        loss, hits = evaluation_loss(forward, batch.model_args(), batch.targets, TokenLoss(hits=True))
        chosen = (batch.targets != IGNORE_INDEX).flatten().to(hits.device)
        return {"loss_sum": float(loss), "correct": int((hits & chosen).sum()), "chosen": int(chosen.sum())}

    @staticmethod
    def finish(sums: Sums) -> dict[str, float]:
        return {"val_loss": sums["loss_sum"] / sums["chosen"],
                "mlm_accuracy": sums["correct"] / sums["chosen"]}


@torch.no_grad()
def fill_masks(forward: Forward, codec: MaskedTokenizer, prompt: str, top_k: int,
               device: torch.device | str = "cpu") -> list[list[tuple[str, float]]]:
    """For each mask of ``prompt``, in order, its ``top_k`` likeliest tokens (as text) and
    their probabilities."""
    ids = codec.encode(prompt)
    at = [i for i, token in enumerate(ids) if token == codec.mask_id]
    logits = forward(torch.tensor([ids], device=device))[0, at].float()
    probs = torch.softmax(logits, dim=-1).cpu()
    fills = []
    for row in probs:
        best = torch.topk(row, min(top_k, row.numel()))
        fills.append([(codec.decode([int(token)]), float(p)) for p, token in zip(best.values, best.indices)])
    return fills
