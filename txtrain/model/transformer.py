"""The decoder-only transformer (GPT): embeddings, a stack of blocks, a final norm and the
output head. Each block is attention and a feed-forward layer, each wrapped in a residual
connection with layer norm before (pre-norm, GPT-2) or after (post-norm, the 2017 paper)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from txtrain.config import ModelConfig
from txtrain.model.attention import KVCache, LayerCache, MultiHeadAttention
from txtrain.model.base import LanguageModel
from txtrain.model.chunked_loss import TokenLoss
from txtrain.model.positions import Rotary

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, cfg.ffn_width, bias=cfg.bias)
        self.act = ACTIVATIONS[str(cfg.activation)]()
        self.down = nn.Linear(cfg.ffn_width, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(self.act(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary | None = None):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.attn_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = MultiHeadAttention(cfg.n_embd, cfg.n_head, cfg.dropout, cfg.bias,
                                       cfg.impl, rotary)
        self.ffn_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.ffn = FeedForward(cfg)
        self.checkpointing = cfg.activation_checkpointing

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.checkpointing and self.training:
            # Keep only the block's input; rerun the body in backward (with the same dropout
            # masks). Inside forward, so that a wrapper's hooks on the block (FSDP gathering
            # its weights) run once, outside the recomputed part.
            return checkpoint(self.body, x, *args, use_reentrant=False, **kwargs)
        return self.body(x, *args, **kwargs)

    def body(self, x: torch.Tensor, causal: bool = True, mask: torch.Tensor | None = None,
             cache: LayerCache | None = None) -> torch.Tensor:
        """``causal=False`` and a key ``mask``: the encoder's bidirectional self-attention.
        ``cache``: the attention's keys and values of earlier generation steps."""
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), causal=causal, mask=mask, cache=cache)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.attn(x, causal=causal, mask=mask, cache=cache))
        return self.ffn_norm(x + self.ffn(x))


class Transformer(LanguageModel):
    """GPT: logits for the next token at every position of ``idx`` (B, T) -> (B, T, V).

    ``vocab_size`` is the task's vocabulary; the embedding is padded to a multiple of
    ``cfg.vocab_multiple`` rows, sliced off the logits (see LanguageModel).
    """

    takes_cache = True

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        rotary = self.add_input_layers(cfg, vocab_size)
        # A dict rather than a list so that a pipeline stage can drop blocks and keep the names
        # of the rest (blocks.5 stays blocks.5), which checkpoints are keyed by.
        self.blocks = nn.ModuleDict({str(i): Block(cfg, rotary) for i in range(cfg.n_layer)})
        self.add_output_layers(cfg)
        self.init_weights(residual_layers=cfg.n_layer)

    def forward(self, idx: torch.Tensor, last_only: bool = False,
                cache: KVCache | None = None, targets: torch.Tensor | None = None,
                loss: TokenLoss | None = None) -> torch.Tensor:
        """Logits (B, T, V); with ``last_only``, those of the last position only, (B, V):
        sampling needs no more, and the head is the costliest matmul of a small model.
        With a ``cache``, ``idx`` continues the positions it holds (generation)."""
        x = self.embed(idx, 0 if cache is None else cache.grow(idx.shape[1]))
        for name, block in self.blocks.items():
            x = block(x, cache=None if cache is None else cache.layer(name))
        return self.output(x[:, -1] if last_only else x, targets, loss)
