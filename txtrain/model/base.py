"""What every architecture provides, written down once: the strategies, the planner and the
trainer rely on this and on nothing else of a model."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from txtrain.config import ModelConfig
from txtrain.model.chunked_loss import TokenLoss
from txtrain.model.positions import LearnedPositions, Rotary, SinusoidalPositions

# The projections that write into the residual stream (GPT-2 scales their initial weights).
RESIDUAL_PROJECTIONS = ("attn.out.weight", "cross.out.weight", "ffn.down.weight")


class LanguageModel(nn.Module):
    """Logits for the next token at every position of ``idx`` (B, T): ``model(idx)`` ->
    (B, T, V), or ``model(idx, sources)`` where the class declares ``needs_sources``.

    Every model provides, under these names:

    - ``cfg``, its ModelConfig, and ``vocab_size``, the task's vocabulary (the logits' width);
    - ``token_embedding``: an nn.Embedding whose rows are padded to a multiple of
      ``cfg.vocab_multiple`` (50257 -> 50304: friendlier to matmul kernels); ``positions``:
      the additive position encoding, or None (rope lives inside attention); ``dropout``;
    - ``blocks``: an nn.ModuleDict of all its blocks, in the order they run;
    - ``final_norm`` and ``head``: the last hidden states' norm and the output projection, as
      wide as the embedding table (the same matrix when ``cfg.tie_embeddings``);
    - ``embed(idx, start=0)``: token ids to first hidden states (``start``: the position of
      the first token), and ``logits(x)``: last hidden states to logits, with the padded rows
      sliced off so that they never touch the loss;
    - ``forward(..., targets=None, loss=None)``: given ``targets``, the loss instead of the
      logits, through ``output(x, targets, loss)`` (the head and the cross-entropy in one,
      chunk by chunk: model/chunked_loss.py);
    - ``forward(..., last_only=False)``: with ``last_only``, the logits of the last position
      only, (B, V): sampling needs no more. A class that sets ``takes_cache`` (the GPT, the
      encoder-decoder) also takes ``cache=None``, a ``KVCache`` (model/attention.py) kept
      between generation steps: ``idx`` then holds only the positions after the cached
      ones, whose keys and values are read from the cache, and theirs are added to it, so
      a new token costs one position instead of a rerun of the sequence. Without a cache
      (training, evaluation) nothing changes;
    - ``num_parameters()``, and ``describe(cfg)``: the layers a config builds, in words,
      without building them.

    What the others rely on:

    - checkpoints are keyed by parameter names, and a checkpoint loads into any layout: the
      names must stay, whatever the strategy (a pipeline stage keeps ``blocks.5`` as
      ``blocks.5``, ``head.weight`` as ``head.weight``);
    - FSDP, compile, activation checkpointing and the planner work block by block through
      ``blocks``; whatever is not in a block is the root (FSDP) or the first stage's
      (``token_embedding``, ``positions``) or the last stage's (``final_norm``, ``head``);
    - ``embed`` and ``logits`` read only the attributes above, so a pipeline stage that holds
      some of them (txtrain.parallel.stage) runs them as they are;
    - ``needs_sources``, known before the model is built (``model_class(cfg)``): the task
      then batches a source apart from the target (``Batch.sources``), and the model cannot
      be split into pipeline stages nor continue a bare prompt (txtrain-sample reads the
      prompt as its source);
    - ``objective``, also known before: "next" (predict each next token: the GPT, the
      encoder-decoder's decoder) or "masked" (recover masked tokens from both sides: the
      encoder), which decides the batches the task makes.
    """

    needs_sources: ClassVar[bool] = False
    objective: ClassVar[str] = "next"
    takes_cache: ClassVar[bool] = False  # forward(..., cache=KVCache) for fast generation
    cfg: ModelConfig
    vocab_size: int
    blocks: nn.ModuleDict

    @classmethod
    def describe(cls, cfg: ModelConfig) -> str:
        return f"{cfg.n_layer} layers"

    # --- building: each model calls these in this order -----------------------------------
    def add_input_layers(self, cfg: ModelConfig, vocab_size: int) -> Rotary | None:
        """The embedding, the positions and the dropout; returns the rotary embedding for
        attention, if any."""
        self.cfg = cfg
        self.vocab_size = vocab_size
        table_size = -(-vocab_size // cfg.vocab_multiple) * cfg.vocab_multiple
        self.token_embedding = nn.Embedding(table_size, cfg.n_embd)
        self.positions = make_additive_positions(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        return Rotary(cfg.n_embd // cfg.n_head, cfg.rope_base) if cfg.pos == "rope" else None

    def add_output_layers(self, cfg: ModelConfig) -> None:
        # Post-norm blocks already end in a norm; pre-norm needs one before the head.
        self.final_norm = nn.LayerNorm(cfg.n_embd, bias=cfg.bias) if cfg.norm == "pre" else nn.Identity()
        self.head = nn.Linear(cfg.n_embd, self.token_embedding.num_embeddings, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.token_embedding.weight

    def init_weights(self, residual_layers: int) -> None:
        """GPT-2's initialisation, the residual projections scaled by 1/sqrt(2 * layers)."""
        self.apply(init_module)
        for name, param in self.named_parameters():
            if name.endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * residual_layers))

    # --- tokens in, logits out --------------------------------------------------------------
    def embed(self, idx: torch.Tensor, start: int = 0) -> torch.Tensor:
        """``start``: the position of ``idx``'s first token (past a KVCache's positions)."""
        x = self.token_embedding(idx)
        if self.cfg.pos == "sinusoidal":
            # As in the 2017 paper: scale the embeddings so the fixed encodings, of size ~1,
            # do not drown the tokens (which start at std 0.02).
            x = x * math.sqrt(self.cfg.n_embd)
        if self.positions is not None:
            x = x + self.positions(idx.shape[1], idx.device, start)
        return self.dropout(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.final_norm(x))
        if logits.shape[-1] > self.vocab_size:  # slice only when padded: FSDP warns about views
            logits = logits[..., : self.vocab_size]
        return logits

    def output(self, x: torch.Tensor, targets: torch.Tensor | None = None,
               loss: TokenLoss | None = None):
        """What ``forward`` returns from the last hidden states: the logits, or given
        ``targets`` the loss (``loss``: how; model/chunked_loss.py), which never holds the
        whole logits. Inside ``forward``, so that a wrapper that gathers the head's weight
        in the module's forward (FSDP) has gathered it."""
        if targets is None:
            return self.logits(x)
        return self.head_loss(x, targets, loss)

    def head_loss(self, x: torch.Tensor, targets: torch.Tensor, loss: TokenLoss | None = None):
        """The final norm, the head and the cross-entropy in one (the padded rows never
        enter it); the pipeline's last stage calls it on its output."""
        return (loss or TokenLoss())(self.final_norm(x), self.head.weight, targets, self.vocab_size)

    def num_parameters(self) -> int:
        """Distinct trainable parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def make_additive_positions(cfg: ModelConfig) -> nn.Module | None:
    if cfg.pos == "learned":
        return LearnedPositions(cfg.max_seq_len, cfg.n_embd)
    if cfg.pos == "sinusoidal":
        return SinusoidalPositions(cfg.n_embd)
    return None  # rope lives inside attention; none has no position information at all


def init_module(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)


def tied_aliases(module: nn.Module) -> dict[str, str]:
    """The second names of parameters that appear twice (a tied head: ``head.weight`` ->
    ``token_embedding.weight``). Checkpoints keep such a parameter once, under its first name."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases
