"""Optimizers and learning-rate schedules.

The schedule is a pure function of the step, written into the optimizer before each update,
so resuming needs nothing but the step number.

``optim=muon`` is one optimizer object, ``MuonAdamW``: Muon for the 2-D matrices of the
transformer blocks (the weights of their Linear layers), AdamW for everything else (embeddings,
head, norms, biases). One object, with a flag on each param group, rather than two optimizers:
the checkpoints' ``get_state_dict`` / ``set_state_dict`` take one optimizer and key its state by
parameter name, so a Muon run resumes in any layout like an AdamW one. Under FSDP each rank
holds a shard of a matrix (a DTensor); Muon's Newton-Schulz orthogonalisation needs the whole
matrix, so each rank gathers the momentum-mixed update (``full_tensor()``), orthogonalises it
(every rank the same) and keeps its own shard of the result. That is one all-gather per matrix
per step, the same traffic as gathering the weights for a forward pass."""

from __future__ import annotations

import math

import torch
from torch import nn

from txtrain.config import OptimConfig, ScheduleConfig


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    # Weight decay on matrices and embeddings only; biases and norm gains are left alone.
    params = [p for p in model.parameters() if p.requires_grad]
    if str(cfg.name) == "muon":
        return MuonAdamW.from_model(model, cfg)
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    name = str(cfg.name)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    # One kernel over every parameter, on a GPU and on a CPU (where it is several times faster
    # than the per-op foreach path, and allocates no temporaries the size of the model).
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    if name == "adam":
        # Adam's weight decay is L2 added to the gradient, unlike AdamW's decoupled decay.
        return torch.optim.Adam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **fused)


def hidden_matrices(model: nn.Module) -> list[nn.Parameter]:
    """What Muon updates: the weights of the Linear layers inside the transformer blocks (under
    any wrapper: DDP's ``module.``, FSDP's own classes are still Linear). Embeddings, the head,
    norms and biases are not."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "blocks" in name.split(".") \
                and module.weight.requires_grad and module.weight.dim() == 2:
            found[id(module.weight)] = module.weight
    return list(found.values())


class MuonAdamW(torch.optim.Optimizer):
    """Muon (torch.optim.Muon's update: Nesterov momentum, 5 quintic Newton-Schulz steps,
    the learning rate scaled by sqrt(max(1, rows/cols)), decoupled weight decay) on the param
    groups flagged ``muon``, AdamW on the others. Each group's ``lr`` is set by ``set_lr`` as
    optim.lr times the group's ``lr_ratio`` (muon_lr / lr for the Muon group), so the schedule
    scales both parts. State per parameter: Muon's ``momentum_buffer``, AdamW's ``step``,
    ``exp_avg`` and ``exp_avg_sq``."""

    def __init__(self, groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
                 momentum: float):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum,
                        muon=False, lr_ratio=1.0, nesterov=True, ns_steps=5)
        super().__init__(groups, defaults)
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon updates 2-D matrices only")

    @classmethod
    def from_model(cls, model: nn.Module, cfg: OptimConfig) -> "MuonAdamW":
        matrices = hidden_matrices(model)
        chosen = {id(p) for p in matrices}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
        groups = [
            {"params": matrices, "muon": True, "lr": cfg.muon_lr, "lr_ratio": cfg.muon_lr / cfg.lr,
             "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ]
        return cls([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                   eps=cfg.eps, momentum=cfg.momentum)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["muon"]:
                self.muon_step(group, params)
            elif params:
                self.adamw_step(group, params)
        return loss

    def muon_step(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
            update = orthogonalise(update, group["ns_steps"])
            rows, cols = p.shape
            p.mul_(1 - lr * decay)
            p.add_(update.to(p.dtype), alpha=-lr * math.sqrt(max(1.0, rows / cols)))

    def adamw_step(self, group: dict, params: list[torch.Tensor]) -> None:
        from torch.optim.adamw import adamw

        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [self.state[p]["exp_avg"] for p in params],
              [self.state[p]["exp_avg_sq"] for p in params], [],
              [self.state[p]["step"] for p in params], foreach=None, amsgrad=False,
              beta1=beta1, beta2=beta2, lr=group["lr"], weight_decay=group["weight_decay"],
              eps=group["eps"], maximize=False)


def orthogonalise(update: torch.Tensor, steps: int) -> torch.Tensor:
    """Muon's approximate U V^T of a matrix: torch.optim.Muon's quintic Newton-Schulz
    iteration, in bf16 on a GPU and in fp32 on a CPU (where bf16 matrix products are many times
    slower). A DTensor (FSDP's shard) is gathered whole first; every rank computes the same
    result and keeps its own shard of it."""
    sharded = hasattr(update, "full_tensor")
    whole = update.full_tensor() if sharded else update
    x = whole.to(torch.bfloat16 if whole.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)  # spectral norm at most 1
    a, b, c = NEWTON_SCHULZ
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    result = x.T if tall else x
    if sharded:
        from torch.distributed.tensor import distribute_tensor

        # Every rank holds the same result: each keeps its shard, with no communication.
        result = distribute_tensor(result.contiguous(), update.device_mesh, update.placements,
                                   src_data_rank=None)
    return result


NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # Keller Jordan's coefficients, as torch.optim.Muon's


def optimizer_state_bytes(cfg: OptimConfig, param_bytes: list[int],
                          muon_bytes: list[int] | None = None) -> int:
    """Bytes of optimizer state for fp32 parameters of the given sizes: Adam keeps two moments
    per parameter and a 4-byte step count per tensor; SGD keeps its momentum buffer. Muon
    (``muon_bytes``: the sizes of the matrices Muon updates, held among ``param_bytes``) keeps
    one momentum buffer per matrix, and AdamW's state for the rest."""
    if str(cfg.name) == "sgd":
        return sum(param_bytes) if cfg.momentum else 0
    if str(cfg.name) == "muon":
        muon_bytes = muon_bytes or []
        adam_bytes = sum(2 * size + 4 for size in param_bytes) - sum(2 * s + 4 for s in muon_bytes)
        return adam_bytes + sum(muon_bytes)
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
    if name == "wsd":  # stable at the peak, then down to the floor at the end
        decay_steps = max(1, round(cfg.decay_fraction * (total_steps - warmup)))
        progress = min(1.0, max(0, step - (total_steps - decay_steps) + 1) / decay_steps)
        if str(cfg.decay_shape) == "1-sqrt":
            progress = math.sqrt(progress)  # 1 - sqrt(progress) of the way from floor to peak
        return 1.0 - (1.0 - floor) * progress
    # Decay starts below the peak and ends at the floor on the last update.
    progress = min(1.0, (step - warmup + 1) / max(1, total_steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """``lr`` (optim.lr times the schedule's factor) into every group; a group with an
    ``lr_ratio`` (optim=muon's matrices: muon_lr / lr) gets that multiple of it."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_ratio", 1.0)


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
