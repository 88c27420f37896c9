"""``parallel=dp``: torch.nn.DataParallel, one process driving every visible GPU.

Each forward splits the batch over the GPUs and gathers the logits on the first; gradients
are summed onto the first GPU's parameters. No launcher needed, but slower than ddp.

DataParallel runs each replica in a thread of its own and re-enters autocast there without
its dtype, which on CUDA means fp16: each replica therefore enters the run's autocast itself
(``AutocastEachReplica``). And it copies the model at every forward, while a compiled block
stays bound to the original's weights on the first GPU: ``compile=true`` is refused.

Only training goes through DataParallel. Evaluation and sampling run the model on the first
GPU: DataParallel gathers the replicas' 0-dim losses into a vector (one loss per GPU, where
the scorers expect one number), and it scatters a one-row sampling batch to one GPU while it
copies the keyword arguments to every GPU, so the other replicas would run without inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from txtrain.config import Config, ConfigError
from txtrain.parallel.base import Strategy
from txtrain.parallel.specs import ParallelConfig
from txtrain.precision import DTYPES
from txtrain.rng import seed_each_gpu

class AutocastEachReplica(nn.Module):
    """Runs ``module`` under autocast to ``dtype``, whatever autocast the calling thread has."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, device_type: str):
        super().__init__()
        self.module = module
        self.dtype = dtype
        self.device_type = device_type

    def forward(self, *args, **kwargs):
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


class DP(Strategy):
    name = "dp"

    def __init__(self, cfg: ParallelConfig, device: str = "auto", precision: str = "fp32",
                 compile: bool = False, seed: int = 0):
        super().__init__(cfg, device)
        self.n_gpus = torch.cuda.device_count() if self.device.type == "cuda" else 0
        self.dtype = DTYPES[precision]
        self.seed = seed
        if self.n_gpus < 2:
            self.warnings.append(f"parallel=dp needs at least 2 GPUs and found {self.n_gpus}; "
                                 "running as parallel=none")
        elif compile:
            raise ConfigError("parallel=dp cannot run compile=true: DataParallel copies the model "
                              "onto every GPU at each forward and a compiled block keeps running "
                              "the first GPU's weights; use parallel=ddp (one process per GPU) or "
                              "compile=false")

    @classmethod
    def from_config(cls, cfg: Config, seq_len: int) -> DP:
        return cls(cfg.parallel, cfg.device, str(cfg.precision.name), cfg.compile, cfg.seed)

    def describe(self) -> str:
        if self.n_gpus < 2:
            return f"none on {self.device} (dp needs 2 GPUs)"
        return f"{self.name} over {self.n_gpus} GPUs"

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.n_gpus < 2:
            return model
        seed_each_gpu(self.seed, self.n_gpus)  # each replica draws dropout from its GPU's generator
        if self.dtype is not None:
            model = AutocastEachReplica(model, self.dtype, self.device.type)
        return nn.DataParallel(model)

    def unwrap(self, model: nn.Module) -> nn.Module:
        while isinstance(model, (nn.DataParallel, AutocastEachReplica)):
            model = model.module
        return model

    @property
    def rng_devices(self) -> list[torch.device]:
        if self.n_gpus < 2:
            return [self.device]
        return [torch.device(self.device.type, index) for index in range(self.n_gpus)]

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        return self.unwrap(model)  # on the first GPU, under the trainer's autocast

    def generate(self, model: nn.Module, run):
        return super().generate(self.unwrap(model), run)
