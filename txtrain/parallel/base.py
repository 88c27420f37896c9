"""The strategy interface: everything that differs between one process and many.

The training loop calls these methods and never asks which strategy it has. A strategy
places (and wraps or shards) the model, picks this rank's rows of the global batch, runs
forward+backward over the micro-batches, reduces metrics, clips the global gradient norm, and
produces and restores the state dicts a checkpoint needs. What each rank holds and runs it
takes from its placement (``specs.py``), which the memory planner asks too.

Losses are sums over target tokens divided by the *global* number of targets in the step, so
the gradients of all micro-batches on all ranks add up (never average) to the gradient of the
whole batch. Strategies that reduce gradients across ranks therefore sum them.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch
import torch.distributed as dist
from torch import nn

from txtrain.collective import agree_or_refuse
from txtrain.config import Config, ConfigError
from txtrain.distributed import own_gpu, require_launched
from txtrain.generate import ModelLogits
from txtrain.model.base import tied_aliases
from txtrain.model.chunked_loss import TokenLoss
from txtrain.parallel.specs import ParallelConfig
from txtrain.precision import Precision
from txtrain.tasks.base import Batch, Evaluation

# inputs -> logits; forward(*inputs, targets=, loss=TokenLoss) -> the loss (tasks/base.py)
Forward = Callable[..., torch.Tensor]
NextLogits = Callable[[torch.Tensor], torch.Tensor]  # inputs (B, T) -> last position's logits (B, V)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible; use device=cpu or device=auto")
    return device


def agreed_gpu() -> int:
    """This process's own GPU (``own_gpu``), once every rank has found one: a node that has none
    to give stops every rank, rather than its own alone while the others go on into their first
    collective."""
    return agree_or_refuse("finding each process's GPU failed", own_gpu)


class Strategy:
    """The interface, with what one process on one device does; each strategy overrides what
    it does differently."""

    name: str  # as in parallel=<name>

    def __init__(self, cfg: ParallelConfig, device: str = "auto"):
        self.cfg = cfg
        # For the run's log, once the run is accepted: a command refused later writes nothing.
        self.warnings: list[str] = []
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.placement = cfg.placement(self.world_size)
        if self.placement.multi_process:
            require_launched(self.name, self.placement.min_ranks)
        self.device = pick_device(device)
        if self.device.type == "cuda" and self.placement.multi_process:  # one GPU per process
            self.device = torch.device("cuda", agreed_gpu())
            torch.cuda.set_device(self.device)
        self.data_parallel_rank = self.placement.data_parallel_rank(self.rank)
        self.data_parallel_size = self.placement.data_parallel_size
        if self.world_size > 1 and not self.placement.multi_process:
            raise ConfigError(f"parallel={self.name} with {self.world_size} processes would train "
                              f"{self.world_size} separate copies; choose parallel=ddp, fsdp or "
                              "pipeline, or start one process")

    @classmethod
    def from_config(cls, cfg: Config, seq_len: int) -> Strategy:
        """The strategy for a run; ``seq_len`` is the longest sequence its task produces."""
        return cls(cfg.parallel, cfg.device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def rng_devices(self) -> list[torch.device]:
        """The devices whose random generators this process draws from (a checkpoint keeps
        their states)."""
        return [self.device]

    def describe(self) -> str:
        return f"{self.name} on {self.device}"

    # --- model ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The module whose parameter names are the Transformer's, inside any wrapper."""
        return model

    # --- data -------------------------------------------------------------------------------
    def micro_batch_size(self, global_batch: int, requested: int | None) -> int:
        return self.placement.micro_batch_size(global_batch, requested)

    def local_batch(self, batch: Batch) -> Batch:
        """This rank's contiguous share of the global batch."""
        share = len(batch) // self.data_parallel_size
        start = self.data_parallel_rank * share
        return batch[start:start + share]

    # --- one step ---------------------------------------------------------------------------
    def no_sync(self, model: nn.Module, last_micro_batch: bool) -> ContextManager:
        """Where gradients would be synchronised, skip it for all but the last micro-batch."""
        return nullcontext()

    def forward_backward(self, model: nn.Module, micro_batches: list[Batch], loss: TokenLoss,
                         precision: Precision) -> torch.Tensor:
        """Forward and backward over this rank's micro-batches; the sum of their losses. The
        model computes the loss itself (``targets=``): its head and the cross-entropy run in
        its forward, where wrappers have its weights ready, and never hold the whole logits."""
        total = torch.zeros((), device=self.device)
        for i, micro in enumerate(micro_batches):
            micro = micro.to(self.device)
            with self.no_sync(model, last_micro_batch=i == len(micro_batches) - 1):
                with precision.autocast():
                    # (.sum(): DataParallel gathers one loss per GPU)
                    loss_sum = model(*micro.model_args(), targets=micro.targets, loss=loss).sum()
                precision.backward(loss_sum)
            total += loss_sum.detach()
        return total

    def reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over all ranks (of a loss that each rank computed on its own share)."""
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
        return value

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to max_norm (0: measure only) and return the global norm before clipping."""
        params = [p for p in model.parameters() if p.grad is not None]
        norm = self.global_norm(nn.utils.get_total_norm([p.grad for p in self.counted_in_norm(params)]))
        if max_norm > 0:
            nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    def counted_in_norm(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        """The parameters whose gradients this rank counts in the global norm (a strategy
        holding one parameter on two ranks counts it on one)."""
        return params

    def global_norm(self, local_norm: torch.Tensor) -> torch.Tensor:
        """The 2-norm of all gradients from the norm of this rank's (identical everywhere
        unless the strategy splits the parameters)."""
        return local_norm

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, evaluation: Evaluation) -> dict:
        """The task's metrics, the same on every rank. Each data-parallel rank scores every
        data_parallel_size-th batch (the batches as one process makes them), and the ranks add
        up their tables of per-batch sums: the figures one process computes (``Evaluation``)."""
        forward = self.evaluation_forward(self.evaluation_model(model))
        mine = range(self.data_parallel_rank, evaluation.n_batches, self.data_parallel_size)
        table = evaluation.score_table(forward, mine)
        rounds = -(-evaluation.n_batches // self.data_parallel_size)
        self.join_forwards(forward, evaluation, rounds - len(mine))
        if self.data_parallel_size > 1:  # then the data-parallel ranks are all the ranks
            table = table.to(self.device)  # (NCCL reduces CUDA tensors only)
            dist.all_reduce(table)
        return evaluation.result(table.cpu())

    def evaluation_model(self, model: nn.Module) -> nn.Module:
        """The module evaluation runs: the prepared model, unless a wrapper would talk to
        other ranks in a forward that they, evaluating other batches, do not make."""
        return model

    def evaluation_forward(self, model: nn.Module) -> Forward:
        """``model`` taking inputs from the host, with the model's own loss (``targets=``)."""
        def forward(*args: torch.Tensor, targets: torch.Tensor | None = None,
                    loss: TokenLoss | None = None):
            if targets is not None:
                targets = targets.to(self.device)
            return model(*(tensor.to(self.device) for tensor in args), targets=targets, loss=loss)

        forward.takes_targets = True  # the model's own loss (chunked_loss.evaluation_loss)
        return forward

    def join_forwards(self, forward: Forward, evaluation: Evaluation, missing: int) -> None:
        """A rank with ``missing`` batches fewer than the busiest (the batches rarely divide
        evenly) makes up that many forwards where a forward talks to the other ranks."""

    def generate(self, model: nn.Module, run: Callable[[NextLogits], object]):
        """``run(next_logits)`` samples through ``next_logits`` (the logits of the last position
        only), with a key/value cache where the model takes one (``generate.ModelLogits``);
        every rank must draw the same tokens. Every rank runs the model (FSDP gathers weights
        in it), then all draw from rank 0's logits: ranks whose logits differed in the last
        bit could draw different tokens, and then their collectives would no longer match."""
        def share(logits: torch.Tensor) -> torch.Tensor:
            if self.world_size > 1:
                logits = logits.float().contiguous()
                dist.broadcast(logits, src=0)
            return logits

        return run(ModelLogits(model, self.device, share=share))

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Model and optimizer state keyed by parameter name, as this rank holds it (whole,
        or as shards for torch.distributed.checkpoint to save and reshard)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.unwrap(model), optimizer,
                                                  options=state_dict_options())
        for alias in tied_aliases(self.unwrap(model)):  # a tied matrix is saved once
            del model_state[alias]
        return {"model": model_state, "optimizer": optim_state}

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_state = dict(state["model"])
        for alias, name in tied_aliases(self.unwrap(model)).items():
            model_state[alias] = model_state[name]
        set_state_dict(self.unwrap(model), optimizer, model_state_dict=model_state,
                       optim_state_dict=state["optimizer"], options=state_dict_options())

    def gather(self, obj: object) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, obj)
        return everyone

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            # No rank tears its connections down while a peer may still be using them.
            dist.barrier()
            dist.destroy_process_group()


def state_dict_options():
    """Optimizer state keyed by parameter name, so any layout loads into any other.
    (torch.distributed.checkpoint is imported when first needed: it adds a second to start-up.)"""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


class SingleDevice(Strategy):
    """``parallel=none``: one process, one device."""

    name = "none"
