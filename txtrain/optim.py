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
    """Multiplier on optim.lr for the update made at ``step`` (0-based, so the run's last
    update is ``total_steps - 1``: that one is at the floor)."""
    warmup = cfg.warmup_steps
    name = str(cfg.name)
    if name == "noam":  # min(s^-0.5, s * w^-1.5), scaled to peak at 1.0 when s = w
        s = step + 1
        return min(s ** -0.5, s * warmup ** -1.5) * warmup ** 0.5
    if step < warmup:
        return (step + 1) / warmup  # the last warm-up update is the peak
    if name == "constant":
        return 1.0
    floor = cfg.min_lr_ratio
    if name == "wsd":  # stable at the peak, then a straight line to the floor at the end
        decay_steps = max(1, round(cfg.decay_fraction * (total_steps - warmup)))
        progress = min(1.0, max(0, step - (total_steps - decay_steps) + 1) / decay_steps)
        return 1.0 - (1.0 - floor) * progress
    # Decay starts below the peak and ends at the floor on the last update.
    progress = min(1.0, (step - warmup + 1) / max(1, total_steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def per_parameter_state(optim_state: dict) -> dict:
    """What a resume reads back of an optimizer's state dict (as get_state_dict gives it,
    flattened or not): each parameter's moments or momentum, not the param groups'
    hyperparameters, which are the resuming run's (its betas, eps, weight decay, momentum)."""
    return {key: value for key, value in optim_state.items()
            if key != "param_groups" and not key.startswith("param_groups.")}


def length_changes_past_lrs(cfg: ScheduleConfig, steps_done: int, planned: int, now: int) -> bool:
    """Whether the first ``steps_done`` updates would have had other learning rates in a run of
    ``now`` steps than in one of ``planned`` (cosine and wsd decay towards the run's end; constant
    and noam do not depend on its length). Probes the last update and a spread of the others."""
    probes = {steps_done - 1, *range(0, steps_done, max(1, steps_done // 256))}
    return any(lr_factor(cfg, step, planned) != lr_factor(cfg, step, now) for step in probes if step >= 0)
