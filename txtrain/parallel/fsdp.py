"""``parallel=fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``).

Every transformer block is its own FSDP unit, and the root holds the rest (embeddings, final
norm, head): a block's parameters are gathered just before it runs and freed after, and
gradients are reduce-scattered so each rank keeps only its shard of them and of the optimizer
state. With ``parallel.replicate > 1`` the ranks form a 2-D mesh (replicate, shard): shards are
all-gathered within a group and gradients also all-reduced across groups (hybrid sharding).
"""

from __future__ import annotations

from typing import ContextManager

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from txtrain.config import Config
from txtrain.parallel.base import Forward, Strategy
from txtrain.parallel.specs import FSDPConfig
from txtrain.precision import DTYPES
from txtrain.tasks.base import Evaluation


class FSDP(Strategy):
    name = "fsdp"

    def __init__(self, cfg: FSDPConfig, device: str = "auto", precision: str = "fp32"):
        super().__init__(cfg, device)
        # Mixed precision the FSDP way: blocks gather their weights in the compute dtype;
        # gradients are reduced, and the sharded weights kept, in fp32.
        self.mixed_precision = MixedPrecisionPolicy(param_dtype=DTYPES[precision],
                                                    reduce_dtype=torch.float32)
        self.placement.check_ranks(f"the {self.world_size} processes")
        shape, names = (cfg.replicate, self.placement.shard_group), ("replicate", "shard")
        if cfg.replicate == 1:
            shape, names = shape[1:], names[1:]
        self.mesh = init_device_mesh(self.device.type, shape, mesh_dim_names=names)

    @classmethod
    def from_config(cls, cfg: Config, seq_len: int) -> FSDP:
        return cls(cfg.parallel, cfg.device, str(cfg.precision.name))

    def describe(self) -> str:
        layout = "x".join(str(n) for n in self.mesh.shape)
        kind = "hybrid (replicate x shard)" if self.cfg.replicate > 1 else "sharded"
        return f"{self.name} {kind} over {layout} processes on {self.device.type}"

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        reshard = self.cfg.reshard_after_forward
        for block in model.blocks.values():
            fully_shard(block, mesh=self.mesh, reshard_after_forward=reshard,
                        mp_policy=self.mixed_precision)
        fully_shard(model, mesh=self.mesh, reshard_after_forward=reshard,
                    mp_policy=self.mixed_precision)
        for unit in [*model.blocks.values(), model]:
            # Sum, not average, across ranks: each rank's loss is already divided by the
            # global number of targets. (As plain sums: gloo has no pre-scaled sum.)
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)
        return model

    def no_sync(self, model: nn.Module, last_micro_batch: bool) -> ContextManager:
        # Keep unsharded gradients across micro-batches; reduce-scatter once, on the last.
        model.set_requires_gradient_sync(last_micro_batch)
        return super().no_sync(model, last_micro_batch)

    def join_forwards(self, forward: Forward, evaluation: Evaluation, missing: int) -> None:
        # Every forward gathers the blocks' weights from all ranks, so a rank with fewer batches
        # joins the others' last forwards: with one row of the first batch, its score dropped.
        for _ in range(missing):
            evaluation.score(forward, evaluation.batch(0)[:1])

    def global_norm(self, local_norm: torch.Tensor) -> torch.Tensor:
        # The gradients are sharded DTensors, and so is the norm computed from them.
        return local_norm.full_tensor()
