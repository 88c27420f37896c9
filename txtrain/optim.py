"""Optimizers and learning-rate schedules.

The schedule is a pure function of the step, written into the optimizer before each update,
so resuming needs nothing but the step number."""

from __future__ import annotations

import math

import torch
from torch import nn

from txtrain.config import OptimConfig, ScheduleConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # Weight decay on matrices and embeddings only; biases and norm gains are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    name = str(cfg.name)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    fused = {"fused": True} if device.type == "cuda" else {}
    if name == "adam":
        # Adam's weight decay is L2 added to the gradient, unlike AdamW's decoupled decay.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)


def optimizer_state_bytes(cfg: OptimConfig, param_bytes: list[int]) -> int:
    """Bytes of optimizer state for fp32 parameters of the given sizes: Adam keeps two moments
    per parameter and a 4-byte step count per tensor; SGD keeps its momentum buffer."""
    if str(cfg.name) == "sgd":
        return sum(param_bytes) if cfg.momentum else 0
    return sum(2 * size + 4 for size in param_bytes)


def lr_factor(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier on optim.lr for the update made at ``step`` (0-based)."""
    warmup = cfg.warmup_steps
    name = str(cfg.name)
    if name == "noam":  # min(s^-0.5, s * w^-1.5), scaled to peak at 1.0 when s = w
        s = step + 1
        return min(s ** -0.5, s * warmup ** -1.5) * warmup ** 0.5
    if step < warmup:
        return (step + 1) / warmup
    if name == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    floor = cfg.min_lr_ratio
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
