"""The 2017 Transformer: an encoder reads the source with bidirectional self-attention; a
decoder writes the target with causal self-attention and cross-attention to the encoder's
output. Both are built from the GPT's attention, feed-forward and block code.

Sources are right-padded with PAD: padded source positions are never attended to (a key
padding mask in the encoder's self-attention and in every cross-attention), so padding cannot
change the encoder's outputs at real positions, nor the decoder's.
"""

from __future__ import annotations

import torch
from torch import nn

from txtrain.config import ModelConfig
from txtrain.model.attention import KVCache, LayerCache, MultiHeadAttention
from txtrain.model.base import LanguageModel
from txtrain.model.chunked_loss import TokenLoss
from txtrain.model.positions import Rotary
from txtrain.model.transformer import Block
from txtrain.tasks.base import PAD


class DecoderBlock(Block):
    """A block with cross-attention between self-attention and the feed-forward layer."""

    def __init__(self, cfg: ModelConfig, rotary: Rotary | None = None):
        super().__init__(cfg, rotary)
        self.cross_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        # No rotary here: queries and keys come from different sequences, whose positions
        # have no common origin.
        self.cross = MultiHeadAttention(cfg.n_embd, cfg.n_head, cfg.dropout, cfg.bias, cfg.impl)

    def body(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
             cache: LayerCache | None = None, cross_cache: LayerCache | None = None) -> torch.Tensor:
        """``cache``, ``cross_cache``: the self- and cross-attention's keys and values of
        earlier generation steps (the cross-attention's are the source's, computed once)."""
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), cache=cache)
            x = x + self.cross(self.cross_norm(x), memory, causal=False, mask=memory_mask, cache=cross_cache)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.attn(x, cache=cache))
        x = self.cross_norm(x + self.cross(x, memory, causal=False, mask=memory_mask, cache=cross_cache))
        return self.ffn_norm(x + self.ffn(x))


class EncoderDecoder(LanguageModel):
    """Logits for the next target token at every position of ``idx`` (B, T), given the source
    ``sources`` (B, S): (B, T, V). One embedding serves source, target and (tied) head.

    ``blocks`` holds the encoder's blocks (``enc_0`` ...) then the decoder's (``dec_0`` ...):
    the strategies shard, compile and checkpoint block by block, whatever the architecture.
    """

    needs_sources = True
    takes_cache = True

    @classmethod
    def describe(cls, cfg: ModelConfig) -> str:
        return f"encoder-decoder, {cfg.n_encoder_layer or cfg.n_layer}+{cfg.n_layer} layers"

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        rotary = self.add_input_layers(cfg, vocab_size)
        n_encoder = cfg.n_encoder_layer or cfg.n_layer
        self.blocks = nn.ModuleDict(
            {f"enc_{i}": Block(cfg, rotary) for i in range(n_encoder)}
            | {f"dec_{i}": DecoderBlock(cfg, rotary) for i in range(cfg.n_layer)})
        # Post-norm blocks already end in a norm; pre-norm needs one after the encoder.
        self.encoder_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.norm == "pre" else nn.Identity()
        self.add_output_layers(cfg)
        self.init_weights(residual_layers=n_encoder + cfg.n_layer)

    def encode(self, sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder's output (B, S, C), and the mask (B, 1, 1, S) of real source tokens."""
        mask = (sources != PAD)[:, None, None, :]
        x = self.embed(sources)
        for name, block in self.blocks.items():
            if name.startswith("enc_"):
                x = block(x, causal=False, mask=mask)
        return self.encoder_norm(x), mask

    def forward(self, idx: torch.Tensor, sources: torch.Tensor, last_only: bool = False,
                cache: KVCache | None = None, targets: torch.Tensor | None = None,
                loss: TokenLoss | None = None) -> torch.Tensor:
        """With a ``cache``, ``idx`` continues the target positions it holds, and the source is
        encoded, and its keys and values projected, at the first step only."""
        memory, memory_mask = self.encoded(sources, cache)
        x = self.embed(idx, 0 if cache is None else cache.grow(idx.shape[1]))
        for name, block in self.blocks.items():
            if name.startswith("dec_"):
                caches = (None, None) if cache is None else (cache.layer(name), cache.layer(f"{name}.cross"))
                x = block(x, memory, memory_mask, *caches)
        return self.output(x[:, -1] if last_only else x, targets, loss)

    def encoded(self, sources: torch.Tensor, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``encode(sources)``, kept in the cache when there is one."""
        if cache is None:
            return self.encode(sources)
        if cache.memory is None:
            cache.memory = self.encode(sources)
        return cache.memory
