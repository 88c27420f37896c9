"""The strategy interface: everything that differs between one process and many.

The training loop calls these methods and never asks which strategy it has. A strategy
places (and wraps or shards) the model, picks this rank's rows of the global batch, runs
forward+backward over the micro-batches, reduces metrics, clips the global gradient norm, and
produces and restores the state dicts a checkpoint needs.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
from torch import nn

from txtrain.config import ConfigError
from txtrain.tasks.base import Batch

MicroStep = Callable[[Batch], torch.Tensor]  # forward + backward of one micro-batch -> its loss


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return device


class SingleProcess:
    """``parallel=none``: one process, one device. Also the base the other strategies extend."""

    name = "none"

    def __init__(self, device: str = "auto"):
        self.device = pick_device(device)
        self.rank = 0
        self.world_size = 1
        self.data_parallel_rank = 0
        self.data_parallel_size = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"{self.name} on {self.device}"

    # --- model ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The plain Transformer inside whatever wrapper this strategy added."""
        return model

    # --- data -------------------------------------------------------------------------------
    def micro_batch_size(self, global_batch: int, requested: int | None) -> int:
        local = global_batch // self.data_parallel_size
        if global_batch % self.data_parallel_size:
            raise ConfigError(f"train.batch_size={global_batch} is not divisible by the "
                              f"{self.data_parallel_size} data-parallel ranks")
        micro = requested or local
        if local % micro:
            raise ConfigError(f"train.micro_batch_size={micro} does not divide the per-rank batch "
                              f"of {local} (train.batch_size={global_batch} over "
                              f"{self.data_parallel_size} ranks)")
        return micro

    def local_batch(self, batch: Batch) -> Batch:
        """This rank's contiguous share of the global batch."""
        share = len(batch) // self.data_parallel_size
        start = self.data_parallel_rank * share
        return batch[start:start + share]

    # --- one step ---------------------------------------------------------------------------
    def no_sync(self, model: nn.Module, last_micro_batch: bool) -> ContextManager:
        """Where gradients would be synchronised, skip it for all but the last micro-batch."""
        return nullcontext()

    def forward_backward(self, model: nn.Module, micro_batches: list[Batch],
                         micro_step: MicroStep) -> torch.Tensor:
        """Sum of the micro-batch losses (each already normalised by the global token count)."""
        total = torch.zeros((), device=self.device)
        for i, micro in enumerate(micro_batches):
            with self.no_sync(model, last_micro_batch=i == len(micro_batches) - 1):
                total += micro_step(micro.to(self.device))
        return total

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to max_norm (0: measure only) and return the global norm before clipping."""
        return nn.utils.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))

    # --- checkpoints ------------------------------------------------------------------------
    def model_state_dict(self, model: nn.Module) -> dict:
        return self.unwrap(model).state_dict()

    def load_model_state_dict(self, model: nn.Module, state: dict) -> None:
        self.unwrap(model).load_state_dict(state)

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                                  state: dict) -> None:
        optimizer.load_state_dict(state)

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass
