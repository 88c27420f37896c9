"""``parallel=ddp``: DistributedDataParallel, one process per device, a full model on each."""

from typing import ContextManager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from txtrain.parallel.base import Strategy


# (No `from __future__ import annotations` here: DDP checks the hook's annotations as types.)
def sum_gradients(process_group: dist.ProcessGroup,
                  bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP's communication hook: all-reduce a bucket of gradients as a sum. (DDP's default
    averages over ranks; our losses are already normalised by the global token count.)"""
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda future: future.value()[0])


class DDP(Strategy):
    name = "ddp"

    def describe(self) -> str:
        return f"{self.name} over {self.world_size} processes on {self.device.type}"

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids)
        wrapped.register_comm_hook(None, sum_gradients)
        return wrapped

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module

    def no_sync(self, model: nn.Module, last_micro_batch: bool) -> ContextManager:
        # Accumulate locally; the all-reduce runs once, in the last micro-batch's backward.
        return super().no_sync(model, last_micro_batch) if last_micro_batch else model.no_sync()

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        # The replica itself (the same weights on every rank): DDP's forward may broadcast
        # buffers, a collective that a rank with fewer evaluation batches would not join.
        return model.module
