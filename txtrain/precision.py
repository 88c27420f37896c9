"""Numeric precision: fp32, or autocast to bf16 / fp16 with the weights, gradients and optimizer
state kept in fp32. fp16 also scales the loss (``torch.amp.GradScaler``), so that small
gradients do not underflow; a step whose gradients overflow is skipped and the scale lowered.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

from txtrain.config import ConfigError, PrecisionConfig

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, cfg: PrecisionConfig, device: torch.device, world_size: int = 1):
        self.name = str(cfg.name)
        self.dtype = DTYPES[self.name]
        self.device = device
        if self.dtype is not None and not torch.amp.autocast_mode.is_autocast_available(device.type):
            raise ConfigError(f"precision={self.name}: {device.type} has no autocast; use precision=fp32")
        if self.name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("precision=bf16: this GPU has no bfloat16; use precision=fp16 or fp32")
        if device.type == "cuda":  # a process-wide switch; fp32 matmuls are the ones it affects
            use_tf32(cfg.tf32)
        self.scaler = None
        if self.name == "fp16":
            if world_size > 1:
                # Sharded gradients: whether any overflowed must be agreed across all ranks.
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
                self.scaler = ShardedGradScaler(device.type, init_scale=cfg.init_scale)
            else:
                self.scaler = torch.amp.GradScaler(device.type, init_scale=cfg.init_scale)
            # Create the scale now: a pipeline stage without the loss never scales one itself.
            self.scaler.scale(torch.zeros((), device=device))

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate (scaled up under fp16)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale_loss(self, scaled: torch.Tensor) -> torch.Tensor:
        return scaled if self.scaler is None else scaled / self.scaler.get_scale()

    def backward(self, loss: torch.Tensor) -> None:
        self.scale(loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring the gradients back to their true size (before clipping reads them)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """Update the weights; under fp16 the scaler skips the update if gradients overflowed
        and adjusts the scale."""
        if self.scaler is None:
            optimizer.step()
        else:
            self.scaler.step(optimizer)
            self.scaler.update()

    def absorb_overflow(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> bool:
        """Under fp16, gradients that overflow while the loss is finite are loss scaling at
        work: the scaler skips the update and lowers the scale. A non-finite loss is not (no
        scale makes the forward pass finite again): False, as where there is no scaler."""
        if self.scaler is None:
            return False
        self.step(optimizer)  # non-finite gradients: the scaler skips the update either way
        return bool(torch.isfinite(loss))

    def metrics(self) -> dict:
        return {} if self.scaler is None else {"loss_scale": float(self.scaler.get_scale())}

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def use_tf32(enabled: bool) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA (Ampere and newer), through the flags
    torch has always had: torch keeps its newer per-backend settings (``fp32_precision``, since
    2.9) in step with them. Set alone, the newer ones leave the older flags disagreeing, and
    whatever reads those (torch.get_float32_matmul_precision(): inductor's autotuning, flex
    attention, other libraries) raises "mix of the legacy and new APIs"."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
