"""The memory planner: what each rank will hold while training, from the config alone.

Parameters, gradients and optimizer state are exact. The model is built on the meta device
(shapes, no storage, so even gpt2-xl costs nothing) and each parameter is placed where the
strategy's placement (``txtrain.parallel.specs``) says: whole on every rank, cut into shards,
or kept by the rank whose pipeline stage owns it (a tied embedding by the first stage's and the
last's). The placement also says how the batch splits into micro-batches, how many of them a
rank holds at once, and what buffers of its own it keeps; this module knows no strategy by name.

Activations are an estimate for one micro-batch at the task's longest sequence, from what each
layer saves for backward (counted by hooking ``saved_tensors_hooks``, see the tests):

- per block and token, in units of the width d and the activation size a (4 bytes in fp32,
  2 under autocast): the residual stream twice in fp32 (8), the normalised inputs of the two
  sub-layers (2a in fp32; 3a under autocast, which casts attention's input once for the
  queries and once for keys and values), queries, keys and values (3a), the attention output
  (a), and the feed-forward's hidden layer before and after its activation (2a x d_ff / d);
  rope adds the rotated queries and keys (2a); dropout adds a mask per dropout layer;
- attention weights, (heads x T x T) per sequence, wherever they are materialised: always for
  ``impl=manual``, and for sdpa with dropout on a CPU (which falls back to the textbook maths,
  in fp32);
- with activation checkpointing only each block's input is kept, plus about two blocks'
  worth while one is recomputed;
- at the loss, computed chunk by chunk (``train.loss_chunk_tokens``, model/chunked_loss.py):
  one chunk's fp32 logits (turned into their gradient in place; under autocast also the
  matmul's output and the gradient's cast), and the hidden states' and the head's gradients,
  summed in fp32 as the chunks go. With ``train.loss_chunk_tokens=0``, the fp32
  log-probabilities and their gradient: about three (B, T, vocab) fp32 tensors at once.

The peak is estimated as parameters + optimizer state + the larger of the forward/backward
phase (activations, loss, gathered or cast weights, and the gradients when micro-batches
accumulate into them) and the update (gradients plus the optimizer's temporaries).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Collection, Iterator

import torch
from torch import nn

from txtrain.config import Config, ConfigError, ModelConfig
from txtrain.optim import hidden_matrices, optimizer_state_bytes
from txtrain.parallel.specs import ParallelConfig, Placement, sharding_strategy

GiB = 2**30
FP32 = 4


@dataclass
class RankPlan:
    """Bytes one rank will hold."""

    rank: int
    params: int
    grads: int
    optimizer: int
    buffers: int  # gathered parameters, gradient buckets, autocast's low-precision weights
    activations: int  # saved for backward: one micro-batch (with the configured checkpointing)
    activations_without_checkpointing: int
    activations_with_checkpointing: int
    loss: int  # logits, log-probabilities and their gradients
    peak: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Layout:
    """What the plan needs beyond the config: the run's shape on the hardware."""

    world_size: int
    vocab_size: int
    seq_len: int  # the longest sequence a batch can hold
    device_type: str  # cpu | cuda: where kernels differ in what they save


def plan_memory(cfg: Config, layout: Layout, model: ModelParameters | None = None) -> list[RankPlan]:
    """A plan for every rank (they differ under uneven shards and pipeline stages). ``model``:
    the config's model's parameters, where the caller has them already."""
    model = model or ModelParameters.of(meta_model(cfg.model, layout.vocab_size), cfg.optim)
    placement = cfg.parallel.placement(layout.world_size)
    return [plan_rank(cfg, layout, placement, model, rank) for rank in range(layout.world_size)]


@dataclass
class ModelParameters:
    """What a plan needs to know of a model's parameters, gathered once: a plan asks it for
    every rank, and a search for what fits asks it for dozens of layouts."""

    params: dict[str, nn.Parameter]  # a tied embedding appears once
    names: dict[str, list[str]]  # every name of each parameter (parameter_names)
    blocks: list[str]
    largest_block: int  # elements of the largest block
    outside_blocks: int  # elements of everything else: embeddings, final norm, head
    head: int  # elements of the head's weight
    muon: set[int]  # the parameters optim=muon updates (ids), none for other optimizers

    @classmethod
    def of(cls, model: nn.Module, optim) -> ModelParameters:
        block_sizes = [numel(model.blocks[b]) for b in model.blocks]
        return cls(params=dict(model.named_parameters()), names=parameter_names(model),
                   blocks=list(model.blocks), largest_block=max(block_sizes, default=0),
                   outside_blocks=numel(model) - sum(block_sizes), head=model.head.weight.numel(),
                   muon={id(p) for p in hidden_matrices(model)} if str(optim.name) == "muon" else set())


def meta_model(cfg: ModelConfig, vocab_size: int) -> nn.Module:
    from txtrain.model import build_model

    with torch.device("meta"), skip_initializers():
        return build_model(cfg, vocab_size)


INITIALIZERS = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")


@contextmanager
def skip_initializers() -> Iterator[None]:
    """Meta tensors hold no values to initialize, and the initializers' meta kernels import
    torch's compiler stack on first use: seconds of start-up for nothing. Make them no-ops."""
    saved = {name: getattr(nn.init, name) for name in INITIALIZERS}
    for name in INITIALIZERS:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def plan_rank(cfg: Config, layout: Layout, placement: Placement, model: ModelParameters,
              rank: int) -> RankPlan:
    blocks = placement.blocks(rank, model.blocks)
    params = model.params
    held = functools.cache(lambda shape: placement.numel_held(shape, rank))  # gpt2-xl: 676 of 12 shapes
    runs = set(blocks)
    local = {name: held(p.shape) for name, p in params.items()
             if any(holds(placement, rank, runs, alias) for alias in model.names[name])}
    param_bytes = sum(n * params[name].element_size() for name, n in local.items())
    trainable = {name: n for name, n in local.items() if params[name].requires_grad}
    grad_bytes = sum(n * params[name].element_size() for name, n in trainable.items())
    # optim=muon: one momentum buffer for each matrix Muon updates, AdamW's state for the rest
    muon_bytes = [n * FP32 for name, n in trainable.items() if id(params[name]) in model.muon]
    optimizer = optimizer_state_bytes(cfg.optim, [n * FP32 for n in trainable.values()], muon_bytes)

    has_head = placement.holds_head(rank)
    micro = placement.planned_micro_batch(cfg.train.batch_size, cfg.train.micro_batch_size)
    in_flight = placement.micro_batches_in_flight(rank)
    act_bytes = 4 if str(cfg.precision.name) == "fp32" else 2
    shape = Activations(cfg.model, micro, layout.seq_len, act_bytes, layout.device_type)
    without_ckpt = in_flight * shape.blocks(len(blocks), checkpointing=False)
    with_ckpt = in_flight * shape.blocks(len(blocks), checkpointing=True)
    activations = with_ckpt if cfg.model.activation_checkpointing else without_ckpt
    loss = in_flight * shape.head(layout.vocab_size, cfg.train.loss_chunk_tokens) if has_head else 0
    buffers = buffer_bytes(cfg, placement, model, blocks, has_head, grad_bytes)

    accumulates = placement.accumulates(cfg.train.batch_size, micro)
    forward_backward = activations + loss + buffers + (grad_bytes if accumulates else 0)
    # The update: gradients, the buffers they are reduced through, and Adam's per-tensor
    # temporaries (on a CPU it updates one tensor at a time; on CUDA the fused kernel needs none).
    largest = max((n * FP32 for n in trainable.values()), default=0)
    update = grad_bytes + placement.gradient_buffer_bytes(grad_bytes) + 2 * largest
    return RankPlan(rank, param_bytes, grad_bytes, optimizer, buffers, activations, without_ckpt,
                    with_ckpt, loss, param_bytes + optimizer + max(forward_backward, update))


def parameter_names(model: nn.Module) -> dict[str, list[str]]:
    """Every name of each parameter, keyed by its first. A tied embedding is also the head's
    weight: a rank that holds either holds it (a pipeline's first and last stage each do)."""
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    return {aliases[0]: aliases for aliases in names.values()}


def holds(placement: Placement, rank: int, blocks: Collection[str], name: str) -> bool:
    """Whether ``rank``, which runs ``blocks``, holds parameter ``name``: by the part of the
    model the name says it belongs to."""
    if name.startswith("blocks."):
        return name.split(".")[1] in blocks
    if name.startswith(("token_embedding.", "positions.")):
        return placement.holds_embeddings(rank)
    return placement.holds_head(rank)  # the final norm and the head


# --- activations --------------------------------------------------------------------------------
@dataclass
class Activations:
    model: ModelConfig
    batch: int
    seq_len: int
    act_bytes: int  # 4 in fp32, 2 under autocast
    device_type: str

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def mask(self, dtype_bytes: int) -> int:
        """Bytes per element of a saved dropout mask: bool on CUDA, the input's dtype on CPU."""
        return 1 if self.device_type == "cuda" else dtype_bytes

    def block(self) -> int:
        """Saved for backward by one block, for one micro-batch."""
        m, a, d = self.model, self.act_bytes, self.model.n_embd
        cpu_fallback = m.impl == "sdpa" and m.dropout > 0 and self.device_type == "cpu"
        materialised = m.impl == "manual" or cpu_fallback
        inner = FP32 if cpu_fallback else a  # the CPU's sdpa fallback computes in fp32
        normed = 2 * a if a == FP32 else 3 * a  # autocast casts attention's input twice (q, kv)
        per_token = (2 * FP32 + normed + 3 * inner + a) * d + 2 * a * m.ffn_width
        per_token += 2 * 2 * 2 * FP32  # two layer norms' mean and 1/std
        if m.pos == "rope":
            per_token += 2 * inner * d  # the rotated queries and keys
        if m.dropout > 0:
            per_token += 2 * self.mask(a) * d  # after attention and after the feed-forward
        total = per_token * self.tokens
        if materialised:
            # The softmax output (fp32 under CUDA's autocast), dropout's mask and output, and
            # the copy cast for the product with the values.
            soft = FP32 if self.device_type == "cuda" or cpu_fallback else a
            per_weight = soft + (self.mask(soft) + soft if m.dropout > 0 else 0)
            per_weight += inner if soft != inner else 0
            total += per_weight * self.batch * m.n_head * self.seq_len ** 2
        else:
            total += FP32 * self.batch * m.n_head * self.seq_len  # the fused kernel's logsumexp
        return total

    def blocks(self, n_blocks: int, checkpointing: bool) -> int:
        if n_blocks == 0:
            return 0
        # In backward, the gradient through the widest layer, the feed-forward's hidden one.
        working = self.act_bytes * self.model.ffn_width * self.tokens
        if checkpointing:  # each block's input, plus two blocks' worth during backward (the
            # one being rebuilt, and what the one after it still holds)
            return (n_blocks * FP32 * self.model.n_embd * self.tokens
                    + min(2, n_blocks) * self.block() + working)
        return n_blocks * self.block() + working

    def head(self, vocab_size: int, chunk_tokens: int = 0) -> int:
        """The final norm's input and output, then the loss. In chunks (``chunk_tokens``): a
        chunk's fp32 logits (under autocast also the matmul's output and the gradient's cast),
        and the gradients of the hidden states and of the head, summed in fp32 in forward and
        kept for backward. Whole (0): at the loss's backward, the fp32 log-probabilities, their
        gradient and the logits' gradient exist at once."""
        d = self.model.n_embd
        norm = (FP32 + self.act_bytes) * d * self.tokens
        if chunk_tokens <= 0:
            return norm + 3 * FP32 * vocab_size * self.tokens
        rows = min(chunk_tokens, self.tokens)
        per_logit = FP32 + (2 * self.act_bytes if self.act_bytes != FP32 else 0)
        return norm + FP32 * d * self.tokens + per_logit * vocab_size * rows + FP32 * vocab_size * d


# --- buffers ------------------------------------------------------------------------------------
def buffer_bytes(cfg: Config, placement: Placement, model: ModelParameters, blocks: list[str],
                 has_head: bool, grad_bytes: int) -> int:
    """Memory that is neither a parameter shard nor an activation but lives through the step."""
    compute = 4 if str(cfg.precision.name) == "fp32" else 2
    gathered = placement.gathered_bytes(model.outside_blocks, model.largest_block, compute)
    if gathered is not None:
        return gathered
    buffers = placement.gradient_buffer_bytes(grad_bytes)
    if compute < 4:  # autocast keeps a low-precision copy of every matrix it multiplies
        matrices = model.largest_block * (1 if cfg.model.activation_checkpointing else len(blocks))
        if has_head:
            matrices += model.head
        buffers += compute * matrices
    return buffers


def numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- what fits ----------------------------------------------------------------------------------
def what_fits(cfg: Config, layout: Layout, budget: int, limit: int = 3) -> list[tuple[str, int]]:
    """Up to ``limit`` changes (as overrides) that bring the busiest rank under ``budget``
    bytes, the least intrusive first: checkpointing, bf16, then sharding the parameters over
    more ranks, then smaller micro-batches."""
    found = []
    # The candidates change the layout, precision and checkpointing, never a parameter's shape.
    model = ModelParameters.of(meta_model(cfg.model, layout.vocab_size), cfg.optim)
    for overrides, candidate, world in candidates(cfg, layout.world_size):
        peak = max(p.peak for p in plan_memory(candidate, dataclasses.replace(layout, world_size=world), model))
        if peak <= budget:
            found.append((overrides, peak))
            if len(found) == limit:
                break
    return found


def candidates(cfg: Config, world: int):
    """(overrides, config, world size) to try, the least intrusive first."""
    sharded = sharding_strategy()
    more_ranks = [n for n in (2, 4, 8, 16, 32, 64, 128, 256)
                  if n > world or (n == world and cfg.parallel.name != sharded.name)]
    options = [dict(ckpt=True), dict(bf16=True), dict(bf16=True, ckpt=True)]
    options += [dict(ranks=n, bf16=True, ckpt=True) for n in more_ranks]
    options += [dict(ranks=n, bf16=True, ckpt=True, micro=m) for n in (8, 64, 256) for m in (8, 4, 2, 1)]
    for option in options:
        yield variant(cfg, world, sharded, **option)


def variant(cfg: Config, world: int, sharded: ParallelConfig, ranks: int | None = None,
            bf16: bool = False, ckpt: bool = False,
            micro: int | None = None) -> tuple[str, Config, int]:
    """``sharded``: the settings of the strategy that shards the parameters over ``ranks``."""
    overrides, changes = [], {}
    if ranks:
        overrides.append(f"parallel={sharded.name} (x{ranks} ranks)")
        changes["parallel"] = sharded
        world = ranks
    if bf16:
        overrides.append("precision=bf16")
        changes["precision"] = dataclasses.replace(cfg.precision, name="bf16")
    if ckpt:
        overrides.append("model.activation_checkpointing=true")
        changes["model"] = dataclasses.replace(cfg.model, activation_checkpointing=True)
    if micro:
        overrides.append(f"train.micro_batch_size={micro}")
        changes["train"] = dataclasses.replace(cfg.train, micro_batch_size=micro)
    return " ".join(overrides), dataclasses.replace(cfg, **changes), world


# --- report ---------------------------------------------------------------------------------------
def busiest(plans: list[RankPlan]) -> RankPlan:
    return max(plans, key=lambda p: p.peak)


def describe(cfg: Config, layout: Layout, plans: list[RankPlan]) -> list[str]:
    """The plan as lines for the log: the busiest rank's parts and its estimated peak."""
    top = busiest(plans)
    micro = cfg.parallel.placement(layout.world_size).planned_micro_batch(
        cfg.train.batch_size, cfg.train.micro_batch_size)
    ckpt = "on" if cfg.model.activation_checkpointing else "off"
    other = (top.activations_without_checkpointing if cfg.model.activation_checkpointing
             else top.activations_with_checkpointing)
    rank = f" (rank {top.rank}, the busiest)" if len(plans) > 1 else ""
    return [
        f"memory plan per rank{rank}: {cfg.parallel.name} x{layout.world_size}, "
        f"{cfg.precision.name}, checkpointing {ckpt}, micro-batch {micro} x {layout.seq_len} tokens",
        f"  parameters {gib(top.params)}, gradients {gib(top.grads)}, optimizer state "
        f"{gib(top.optimizer)}, buffers {gib(top.buffers)}",
        f"  activations {gib(top.activations)} (checkpointing {'off' if ckpt == 'on' else 'on'}: "
        f"{gib(other)}), loss {gib(top.loss)}",
        f"  estimated peak {gib(top.peak)}",
    ]


def verdict(cfg: Config, layout: Layout, plans: list[RankPlan], device_memory_gb: float) -> list[str]:
    budget = int(device_memory_gb * GiB)
    peak = busiest(plans).peak
    if peak <= budget:
        return [f"fits in {device_memory_gb:g} GiB per device ({100 * peak / budget:.0f}% used)"]
    lines = [f"does not fit in {device_memory_gb:g} GiB per device (needs about {gib(peak)})"]
    fits = what_fits(cfg, layout, budget)
    if not fits:
        return lines + ["  nothing tried fits: a smaller model or sequence length, or more memory"]
    return lines + ["what would fit:"] + [f"  {overrides}: {gib(peak)}" for overrides, peak in fits]


def gib(n_bytes: int) -> str:
    if n_bytes >= GiB:
        return f"{n_bytes / GiB:.2f} GiB"
    return f"{n_bytes / 2**20:.1f} MiB"


def check_world_size(cfg: Config, placement: Placement) -> None:
    """What the run would refuse once started, refused from the config alone."""
    world = placement.world_size
    if world < placement.min_ranks:
        raise ConfigError(f"parallel={cfg.parallel.name} needs {placement.min_ranks} or more ranks: "
                          "set plan.world_size")
    placement.check_ranks(f"plan.world_size={world}")
    placement.check_blocks(cfg.model.n_layer)
    placement.micro_batch_size(cfg.train.batch_size, cfg.train.micro_batch_size)


def report(cfg: Config, layout: Layout, plans: list[RankPlan],
           device_memory_gb: float | None) -> list[str]:
    lines = describe(cfg, layout, plans)
    if device_memory_gb:
        lines += verdict(cfg, layout, plans, device_memory_gb)
    return lines


def plan_only(cfg: Config) -> list[str]:
    """``plan=true``: the report for the configured run, without building anything real."""
    from txtrain.model import model_class
    from txtrain.parallel.base import pick_device
    from txtrain.tasks import build_task

    world = 1
    if cfg.parallel.multi_process:
        world = cfg.plan.world_size or int(os.environ.get("WORLD_SIZE", 0)) or cfg.launch.nproc_per_node
    check_world_size(cfg, cfg.parallel.placement(world))
    task = build_task(cfg.task, cfg.seed, cfg.progress, model_class(cfg.model))
    device = pick_device(cfg.device)
    layout = Layout(world, task.vocab_size, task.max_seq_len, device.type)
    return report(cfg, layout, plan_memory(cfg, layout),
                  cfg.plan.device_memory_gb or device_memory_gb(device))


def device_memory_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory / GiB
