"""The encoder-only transformer (BERT's shape): the GPT's blocks with bidirectional attention,
trained to recover masked tokens from both sides (``tasks/masked.py``).

Each position sees every real position of its sequence. Sequences of different lengths are
right-padded and come with a ``padding_mask`` (True at real tokens): padded positions are never
attended to, so padding cannot change the outputs at real positions. No token id is reserved
for padding, since in text every id is a real token.
"""

from __future__ import annotations

import torch
from torch import nn

from txtrain.config import ModelConfig
from txtrain.model.base import LanguageModel
from txtrain.model.chunked_loss import TokenLoss
from txtrain.model.transformer import Block


class Encoder(LanguageModel):
    """Logits for the token at every position of ``idx`` (B, T) -> (B, T, V), read from the
    whole sequence; the head is the embedding matrix when ``cfg.tie_embeddings`` (BERT's)."""

    objective = "masked"

    @classmethod
    def describe(cls, cfg: ModelConfig) -> str:
        return f"encoder, {cfg.n_layer} bidirectional layers"

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        rotary = self.add_input_layers(cfg, vocab_size)
        self.blocks = nn.ModuleDict({str(i): Block(cfg, rotary) for i in range(cfg.n_layer)})
        self.add_output_layers(cfg)
        self.init_weights(residual_layers=cfg.n_layer)

    def forward(self, idx: torch.Tensor, padding_mask: torch.Tensor | None = None,
                last_only: bool = False, targets: torch.Tensor | None = None,
                loss: TokenLoss | None = None) -> torch.Tensor:
        """``padding_mask`` (B, T): True at real tokens; None when every position is real.
        ``targets``: the loss instead of the logits (LanguageModel.output)."""
        keys = None if padding_mask is None else padding_mask[:, None, None, :].to(idx.device)
        x = self.embed(idx)
        for block in self.blocks.values():
            x = block(x, causal=False, mask=keys)
        return self.output(x[:, -1] if last_only else x, targets, loss)
