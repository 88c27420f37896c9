"""The decoder-only transformer (GPT): embeddings, a stack of blocks, a final norm and the
output head. Each block is attention and a feed-forward layer, each wrapped in a residual
connection with layer norm before (pre-norm, GPT-2) or after (post-norm, the 2017 paper)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from txtrain.config import ModelConfig
from txtrain.model.attention import MultiHeadAttention
from txtrain.model.positions import LearnedPositions, Rotary, SinusoidalPositions

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

    def body(self, x: torch.Tensor, causal: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``causal=False`` and a key ``mask``: the encoder's bidirectional self-attention."""
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x), causal=causal, mask=mask)
            return x + self.ffn(self.ffn_norm(x))
        x = self.attn_norm(x + self.attn(x, causal=causal, mask=mask))
        return self.ffn_norm(x + self.ffn(x))


class Transformer(nn.Module):
    """GPT: logits for the next token at every position of ``idx`` (B, T) -> (B, T, V).

    ``vocab_size`` is the task's vocabulary; the embedding is padded to a multiple of
    ``cfg.vocab_multiple`` rows (50257 -> 50304: friendlier to matmul kernels). Padded rows are
    sliced off the logits, so they never touch the loss.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int):
        super().__init__()
        table_size, rotary = add_input_layers(self, cfg, vocab_size)
        # A dict rather than a list so that a pipeline stage can drop blocks and keep the names
        # of the rest (blocks.5 stays blocks.5), which checkpoints are keyed by.
        self.blocks = nn.ModuleDict({str(i): Block(cfg, rotary) for i in range(cfg.n_layer)})
        # Post-norm blocks already end in a norm; pre-norm needs one before the head.
        self.final_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.norm == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.n_embd, table_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.token_embedding.weight
        self.apply(init_weights)
        # GPT-2: scale the projections that write into the residual stream by 1/sqrt(2 * layers).
        for name, param in self.named_parameters():
            if name.endswith(("attn.out.weight", "ffn.down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(idx)
        if self.cfg.pos == "sinusoidal":
            # As in the 2017 paper: scale the embeddings so the fixed encodings, of size ~1,
            # do not drown the tokens (which start at std 0.02).
            x = x * math.sqrt(self.cfg.n_embd)
        if self.positions is not None:
            x = x + self.positions(idx.shape[1], idx.device)
        return self.dropout(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.final_norm(x))
        if logits.shape[-1] > self.vocab_size:  # slice only when padded: FSDP warns about views
            logits = logits[..., : self.vocab_size]
        return logits

    def forward(self, idx: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, V); with ``last_only``, those of the last position only, (B, V):
        sampling needs no more, and the head is the costliest matmul of a small model."""
        # A pipeline stage lacks the embedding (all but the first stage) or the head (all but
        # the last): it takes and gives hidden states instead of tokens and logits.
        x = self.embed(idx) if self.token_embedding is not None else idx
        for block in self.blocks.values():
            x = block(x)
        if self.head is None:
            return x
        return self.logits(x[:, -1] if last_only else x)

    def num_parameters(self) -> int:
        """Distinct trainable parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def add_input_layers(model: nn.Module, cfg: ModelConfig, vocab_size: int) -> tuple[int, Rotary | None]:
    """What turns token ids into the first hidden states, shared by both architectures: the
    embedding (rows padded to ``cfg.vocab_multiple``), the positions and the dropout. Returns
    the padded table size (for the head) and the rotary embedding for attention, if any."""
    model.cfg = cfg
    model.vocab_size = vocab_size
    table_size = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
    model.token_embedding = nn.Embedding(table_size, cfg.n_embd)
    model.positions = make_additive_positions(cfg)
    model.dropout = nn.Dropout(cfg.dropout)
    rotary = Rotary(cfg.n_embd // cfg.n_head, cfg.rope_base) if cfg.pos == "rope" else None
    return table_size, rotary


def make_additive_positions(cfg: ModelConfig) -> nn.Module | None:
    if cfg.pos == "learned":
        return LearnedPositions(cfg.max_seq_len, cfg.n_embd)
    if cfg.pos == "sinusoidal":
        return SinusoidalPositions(cfg.n_embd)
    return None  # rope lives inside attention; none has no position information at all


def init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
