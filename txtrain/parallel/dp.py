"""``parallel=dp``: torch.nn.DataParallel, one process driving every visible GPU.

Each forward splits the batch over the GPUs and gathers the logits on the first; gradients
are summed onto the first GPU's parameters. No launcher needed, but slower than ddp."""

from __future__ import annotations

import logging

import torch
from torch import nn

from txtrain.config import ParallelConfig
from txtrain.parallel.base import SingleProcess

log = logging.getLogger("txtrain")


class DP(SingleProcess):
    name = "dp"

    def __init__(self, cfg: ParallelConfig, device: str = "auto"):
        super().__init__(cfg, device)
        self.n_gpus = torch.cuda.device_count() if self.device.type == "cuda" else 0
        if self.n_gpus < 2:
            log.warning(f"parallel=dp needs at least 2 GPUs and found {self.n_gpus}; "
                        "running as parallel=none")

    def describe(self) -> str:
        if self.n_gpus < 2:
            return f"none on {self.device} (dp needs 2 GPUs)"
        return f"{self.name} over {self.n_gpus} GPUs"

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return nn.DataParallel(model) if self.n_gpus >= 2 else model

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.DataParallel) else model
