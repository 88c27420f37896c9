"""What each parallel strategy is, without torch: its settings, how it lays a run out over the
ranks, and where its class lives.

Nothing here imports torch or a strategy's module (fsdp and pipeline take seconds to import).
The settings must be known before Hydra composes the config, which the command line checks
before torch loads; and the memory planner asks a placement what each rank would hold and run
from the config alone, in one process, before any process group exists (``plan=true
plan.world_size=8`` on a laptop). The running strategy asks the same placement, so that plan and
run agree by construction.

A new strategy needs its class (a module of this package), its settings and placement here
when the existing ones do not describe it, one line in ``STRATEGIES``, and
``configs/parallel/<name>.yaml``, which picks the settings' schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Sequence

from txtrain.config import Config, ConfigError, require, require_positive

FP32 = 4


# --- settings: one schema per strategy, composed from configs/parallel/<name>.yaml -------------
@dataclass
class ParallelConfig:
    """The settings every strategy has; a strategy with settings of its own extends it."""

    name: str = "none"

    def __post_init__(self) -> None:
        spec = STRATEGIES.get(self.name)
        require(spec is not None, f"parallel.name={self.name} is not one of {', '.join(STRATEGIES)}")
        require(type(self) is spec.settings, f"parallel.name={self.name} needs the settings of "
                f"parallel={self.name}; choose the strategy with parallel={self.name}")

    def check_run(self, cfg: Config) -> None:
        """Checks against the rest of the run's config (``Config.__post_init__`` calls it)."""

    @property
    def multi_process(self) -> bool:
        """Whether the strategy runs one process per device (started by torchrun)."""
        return STRATEGIES[self.name].placement.multi_process

    def placement(self, world_size: int) -> Placement:
        """How this strategy lays the run out over ``world_size`` ranks."""
        return STRATEGIES[self.name].placement(self, world_size)


@dataclass
class FSDPConfig(ParallelConfig):
    name: str = "fsdp"
    reshard_after_forward: bool = True  # false: keep parameters gathered from forward to backward
    replicate: int = 1  # > 1: hybrid sharding, replicate over this many groups, shard within each

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("parallel", replicate=self.replicate)


PIPELINE_SCHEDULES = ("gpipe", "1f1b", "interleaved")  # a str, not an enum: "1f1b" is no name


@dataclass
class PipelineConfig(ParallelConfig):
    name: str = "pipeline"
    schedule: str = "1f1b"  # gpipe | 1f1b | interleaved (1F1B over several stages per rank)
    n_microbatches: int = 4  # the global batch runs through the stages in this many parts
    stages_per_rank: int = 1  # interleaved only: model chunks per rank (2 or more)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive("parallel", n_microbatches=self.n_microbatches,
                         stages_per_rank=self.stages_per_rank)
        require(self.schedule in PIPELINE_SCHEDULES, f"parallel.schedule={self.schedule} is not "
                f"one of {', '.join(PIPELINE_SCHEDULES)}")
        if self.schedule == "interleaved":
            require(self.stages_per_rank >= 2, "parallel.schedule=interleaved needs "
                    f"parallel.stages_per_rank >= 2, got {self.stages_per_rank}")
        else:
            require(self.stages_per_rank == 1, f"parallel.stages_per_rank={self.stages_per_rank} "
                    "needs parallel.schedule=interleaved")

    def check_run(self, cfg: Config) -> None:
        require(cfg.model.arch == "gpt",
                f"parallel=pipeline splits model.arch=gpt only; train model.arch={cfg.model.arch} "
                "with parallel=none, dp, ddp or fsdp")


# --- placements: what each rank holds and runs ---------------------------------------------------
class Placement:
    """One process holds the whole model and runs the whole batch (``none``, and ``dp``, whose
    GPUs share one process). The base of the others, which answer differently where they
    differ."""

    multi_process = False  # one process per device, started by torchrun
    min_ranks = 1
    shards_parameters = False  # each rank holds a part of every parameter

    def __init__(self, cfg: ParallelConfig, world_size: int):
        self.cfg = cfg
        self.world_size = world_size

    # --- what a rank holds ------------------------------------------------------------------
    def numel_held(self, shape: Sequence[int], rank: int) -> int:
        """Elements that ``rank`` holds of a parameter of ``shape`` (one of those it holds:
        see ``blocks``, ``holds_embeddings`` and ``holds_head``)."""
        return prod(shape)

    def blocks(self, rank: int, block_names: list[str]) -> list[str]:
        """The blocks ``rank`` holds and runs, in the model's order."""
        return list(block_names)

    def holds_embeddings(self, rank: int) -> bool:
        return True

    def holds_head(self, rank: int) -> bool:
        """The final norm and the head, and so the loss."""
        return True

    # --- how a global batch splits ----------------------------------------------------------
    @property
    def data_parallel_size(self) -> int:
        """Ranks that each take their own share of the global batch."""
        return 1

    def data_parallel_rank(self, rank: int) -> int:
        return rank if self.data_parallel_size > 1 else 0

    def micro_batch_size(self, global_batch: int, requested: int | None) -> int:
        """Each data-parallel rank takes an equal share, in micro-batches of ``requested``."""
        size = self.data_parallel_size
        local = global_batch // size
        if global_batch % size:
            raise ConfigError(f"train.batch_size={global_batch} is not divisible by the "
                              f"{size} data-parallel ranks")
        micro = requested or local
        if local % micro:
            raise ConfigError(f"train.micro_batch_size={micro} does not divide the per-rank batch "
                              f"of {local} (train.batch_size={global_batch} over {size} ranks)")
        return micro

    def planned_micro_batch(self, global_batch: int, requested: int | None) -> int:
        """Sequences per forward pass on one rank, as ``micro_batch_size`` but never refusing:
        the planner also sizes layouts that the batch does not divide (what would fit)."""
        local = max(1, global_batch // self.data_parallel_size)
        return min(local, requested or local)

    def accumulates(self, global_batch: int, micro_batch: int) -> bool:
        """Whether a rank's micro-batches add up their gradients (which then live through the
        forward passes after the first)."""
        return max(1, global_batch // self.data_parallel_size) // micro_batch > 1

    def micro_batches_in_flight(self, rank: int) -> int:
        """Micro-batches whose activations ``rank`` holds at once."""
        return 1

    # --- memory of its own ------------------------------------------------------------------
    def gradient_buffer_bytes(self, grad_bytes: int) -> int:
        """Buffers the gradients are reduced through, held from backward through the update."""
        return 0

    def gathered_bytes(self, root_numel: int, block_numel: int, compute_bytes: int) -> int | None:
        """Bytes of parameters gathered whole for forward and backward, with their full
        gradients; ``root_numel`` counts the parameters outside the blocks, ``block_numel``
        those of the largest block. None: a rank computes with the parameters it holds (which
        autocast then copies into the compute dtype)."""
        return None

    # --- what cannot work on these ranks ----------------------------------------------------
    def check_ranks(self, ranks: str) -> None:
        """Refuse a world size the layout cannot use; ``ranks`` names it for the message
        ("plan.world_size=8", "the 8 processes")."""

    def check_blocks(self, n_blocks: int) -> None:
        """Refuse a model the layout cannot split."""


class Replicas(Placement):
    """``ddp``: one process per device, each with a whole copy of the model and its own share
    of the batch; gradients are all-reduced through buckets, a second copy of them."""

    multi_process = True

    @property
    def data_parallel_size(self) -> int:
        return self.world_size

    def gradient_buffer_bytes(self, grad_bytes: int) -> int:
        return grad_bytes


class Shards(Placement):
    """``fsdp``: each parameter cut into dim-0 chunks over a shard group (``torch.chunk``, as
    FSDP2 does), the groups replicated ``parallel.replicate`` times; every rank its own share
    of the batch."""

    multi_process = True
    shards_parameters = True

    @property
    def shard_group(self) -> int:
        """Ranks that share one copy of the parameters between them."""
        return self.world_size // self.cfg.replicate

    def numel_held(self, shape: Sequence[int], rank: int) -> int:
        """Chunk ``rank % group`` of ``torch.chunk(param, group, dim=0)``: chunks of
        ceil(rows / group) rows, the last ones shorter or empty."""
        group, index = self.shard_group, rank % self.shard_group
        rows = shape[0] if len(shape) else 1
        per_row = prod(shape[1:]) if len(shape) else 1
        chunk = -(-rows // group)
        return max(0, min(chunk, rows - index * chunk)) * per_row

    @property
    def data_parallel_size(self) -> int:
        return self.world_size

    def gathered_bytes(self, root_numel: int, block_numel: int, compute_bytes: int) -> int:
        # The root (embeddings, final norm, head) stays gathered from forward to backward; a
        # block is gathered while it runs, the next one already being fetched; in backward a
        # block's full gradients exist, and a flat copy of them to reduce-scatter. Gathered in
        # the compute dtype: autocast finds nothing to cast.
        gathered = root_numel + 2 * block_numel
        return compute_bytes * gathered + FP32 * gathered

    def check_ranks(self, ranks: str) -> None:
        if self.world_size % self.cfg.replicate:
            raise ConfigError(f"parallel.replicate={self.cfg.replicate} does not divide {ranks}")


class Stages(Placement):
    """``pipeline``: the blocks split into consecutive stages, stage i on rank i % world_size
    (rank r holds stages r, r + world_size, ... when interleaved); the embeddings on the first
    stage, the final norm and the head on the last. A tied embedding matrix is held by both (as
    Megatron-LM does), their gradients summed before each update. The whole batch runs through
    the stages in ``parallel.n_microbatches`` parts."""

    multi_process = True
    min_ranks = 2

    def __init__(self, cfg: PipelineConfig, world_size: int):
        super().__init__(cfg, world_size)
        self.n_stages = world_size * cfg.stages_per_rank
        self.last_rank = (self.n_stages - 1) % world_size

    def stages(self, rank: int) -> list[int]:
        return [rank + k * self.world_size for k in range(self.cfg.stages_per_rank)]

    def stage_blocks(self, block_names: list[str]) -> list[list[str]]:
        """Each stage's blocks: consecutive runs, the first ones one longer when the stages do
        not divide the blocks evenly."""
        size, extra = divmod(len(block_names), self.n_stages)
        bounds = [0]
        for stage in range(self.n_stages):
            bounds.append(bounds[-1] + size + (stage < extra))
        return [block_names[bounds[i]:bounds[i + 1]] for i in range(self.n_stages)]

    def blocks(self, rank: int, block_names: list[str]) -> list[str]:
        by_stage = self.stage_blocks(block_names)
        return [name for stage in self.stages(rank) for name in by_stage[stage]]

    def holds_embeddings(self, rank: int) -> bool:
        return 0 in self.stages(rank)

    def holds_head(self, rank: int) -> bool:
        return rank == self.last_rank

    def embedding_ranks(self) -> list[int]:
        """The ranks that hold a tied embedding matrix: the first stage's and the last's (one
        rank, if it holds both)."""
        return sorted({rank for rank in range(self.world_size)
                       if self.holds_embeddings(rank) or self.holds_head(rank)})

    def micro_batch_size(self, global_batch: int, requested: int | None) -> int:
        n_microbatches = self.cfg.n_microbatches
        micro, parts = divmod(global_batch, n_microbatches)
        if parts or (requested and requested != micro):
            raise ConfigError(f"parallel=pipeline splits train.batch_size={global_batch} into "
                              f"parallel.n_microbatches={n_microbatches} equal micro-"
                              "batches; make it divisible (and leave train.micro_batch_size unset)")
        return micro

    def planned_micro_batch(self, global_batch: int, requested: int | None) -> int:
        return max(1, global_batch // self.cfg.n_microbatches)

    def accumulates(self, global_batch: int, micro_batch: int) -> bool:
        return True  # every micro-batch's backward adds to the stage's gradients

    def micro_batches_in_flight(self, rank: int) -> int:
        # GPipe runs every forward before any backward; 1F1B keeps up to one per later stage.
        n_micro = self.cfg.n_microbatches
        if self.cfg.schedule == "gpipe":
            return n_micro
        return min(n_micro, self.n_stages - rank)

    def check_blocks(self, n_blocks: int) -> None:
        if n_blocks < self.n_stages:
            raise ConfigError(f"parallel=pipeline needs at least one block per stage: "
                              f"model.n_layer={n_blocks} < {self.n_stages} stages")


# --- the registry -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    settings: type[ParallelConfig]
    placement: type[Placement]
    strategy: str  # "module:Class", imported only when a run builds it


STRATEGIES: dict[str, Spec] = {
    "none": Spec(ParallelConfig, Placement, "txtrain.parallel.base:SingleDevice"),
    "dp": Spec(ParallelConfig, Placement, "txtrain.parallel.dp:DP"),
    "ddp": Spec(ParallelConfig, Replicas, "txtrain.parallel.ddp:DDP"),
    "fsdp": Spec(FSDPConfig, Shards, "txtrain.parallel.fsdp:FSDP"),
    "pipeline": Spec(PipelineConfig, Stages, "txtrain.parallel.pipeline:Pipeline"),
}


def sharding_strategy() -> ParallelConfig:
    """The settings, at their defaults, of the strategy that shards every parameter over all
    ranks (what the planner suggests when a model does not fit)."""
    return next(spec.settings(name=name) for name, spec in STRATEGIES.items()
                if spec.placement.shards_parameters)
