"""Numeric precision of the forward pass: fp32, or autocast to bf16 with fp32 weights."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager

import torch

from txtrain.config import PrecisionConfig

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class Precision:
    def __init__(self, cfg: PrecisionConfig, device: torch.device):
        self.name = str(cfg.name)
        self.dtype = DTYPES[self.name]
        self.device = device

    def autocast(self) -> ContextManager:
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
