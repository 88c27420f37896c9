"""What a pipeline stage runs: a slice of the model, which takes and gives hidden states
where the whole model takes tokens and gives logits. The last stage's hidden states go to the
model's own head and loss (``head_loss``), or to its ``logits`` where logits are asked for."""

from __future__ import annotations

import torch
from torch import nn

from txtrain.model.base import LanguageModel


class ModelSlice(nn.Module):
    """Some of ``model``'s blocks, with the embeddings if ``first`` and the final norm and head
    if ``last``. It shares their parameters with ``model`` and holds them under the model's
    names, so parameter names, and with them checkpoints, are those of the whole model
    (``blocks.5`` stays ``blocks.5``, the head ``head.weight``)."""

    def __init__(self, model: LanguageModel, block_names: list[str], first: bool, last: bool):
        super().__init__()
        if model.needs_sources:  # its decoder blocks also read the encoder's output
            raise ValueError(f"{type(model).__name__} reads a source as well as the tokens: "
                             "it cannot be cut into pipeline stages")
        self.cfg, self.vocab_size = model.cfg, model.vocab_size
        self.first, self.last = first, last
        # In the model's order, so that its parameters are listed in the whole model's order.
        if first:
            self.token_embedding, self.positions, self.dropout = (
                model.token_embedding, model.positions, model.dropout)
        self.blocks = nn.ModuleDict({name: model.blocks[name] for name in block_names})
        if last:
            self.final_norm, self.head = model.final_norm, model.head

    # The parts have the model's names: its own embedding and output maths apply unchanged.
    embed = LanguageModel.embed
    logits = LanguageModel.logits
    head_loss = LanguageModel.head_loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids in on the first stage, hidden states elsewhere, and hidden states out (the
        last stage's before the final norm)."""
        if self.first:
            x = self.embed(x)
        for block in self.blocks.values():
            x = block(x)
        return x
