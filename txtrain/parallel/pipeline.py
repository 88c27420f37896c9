"""``parallel=pipeline``: pipeline parallelism with ``torch.distributed.pipelining``.

The blocks are split into consecutive stages, one per rank (or ``stages_per_rank`` per rank,
round-robin, for the interleaved schedule); the first stage also holds the embeddings, the
last the final norm and the head (``specs.Stages`` says which rank holds what). Each rank
keeps the Transformer with only its own parts, so parameter names, and with them checkpoints,
are those of the whole model. A step's batch runs through the stages as ``n_microbatches``
micro-batches in the order the schedule dictates.

A tied embedding matrix is held as Megatron-LM holds it: the first stage's rank as the
embedding, the last's as the head's weight, both from the same initial values (every rank
builds the whole model from the same seed). After backward the two ranks sum its gradient
over a group of their own, so both take the same update; the global gradient norm counts it
once, and a checkpoint keeps its optimizer state once, under the whole model's name.

A stage sizes the activations it exchanges from the first batch it runs, and receives every
later one into buffers of that shape: a batch of any other shape would come out wrong (or
abort gloo). Training always feeds (train.batch_size, seq_len). Evaluation and sampling feed a
few other shapes (a full eval batch, a shorter last one, one row per sampled token), so each
of those gets forward-only stages of its own, built on first use and kept.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleGPipe,
                                                    ScheduleInterleaved1F1B, ScheduleLoopedBFS)

from txtrain.config import Config
from txtrain.model.chunked_loss import TokenLoss
from txtrain.parallel.base import Forward, NextLogits, Strategy
from txtrain.parallel.specs import PipelineConfig
from txtrain.parallel.stage import ModelSlice
from txtrain.precision import Precision
from txtrain.tasks.base import IGNORE_INDEX, PAD, Batch

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved": ScheduleInterleaved1F1B}


class Pipeline(Strategy):
    name = "pipeline"

    def __init__(self, cfg: PipelineConfig, device: str = "auto", seq_len: int = 0):
        super().__init__(cfg, device)
        self.n_stages = self.placement.n_stages
        self.my_stages = self.placement.stages(self.rank)
        self.is_first = self.placement.holds_embeddings(self.rank)
        self.is_last = self.placement.holds_head(self.rank)
        self.last_rank = self.placement.last_rank
        # Every micro-batch has the same shape: the stages exchange fixed-size activations.
        self.seq_len = seq_len
        self.loss: TokenLoss | None = None  # this step's, set by forward_backward
        self.precision: Precision | None = None

    @classmethod
    def from_config(cls, cfg: Config, seq_len: int) -> Pipeline:
        return cls(cfg.parallel, cfg.device, seq_len)

    def describe(self) -> str:
        return (f"{self.name} of {self.n_stages} stages over {self.world_size} processes on "
                f"{self.device.type}, schedule {self.cfg.schedule}, "
                f"{self.cfg.n_microbatches} micro-batches")

    # --- model ------------------------------------------------------------------------------
    def prepare(self, model: nn.Module) -> nn.Module:
        self.placement.check_blocks(model.cfg.n_layer)
        stage_blocks = self.placement.stage_blocks(list(model.blocks))
        # The last stage gives hidden states: its loss (stage_loss, evaluation's) runs the head
        # chunk by chunk, and logits are made from them only where asked for.
        chunks = [ModelSlice(model, stage_blocks[s], first=s == 0, last=s == self.n_stages - 1)
                  for s in self.my_stages]
        self.loss_head = chunks[-1]
        mine = ModelSlice(model, self.placement.blocks(self.rank, list(model.blocks)),
                          first=self.is_first, last=self.is_last).to(self.device)
        self.vocab_size = mine.vocab_size
        self.share_tied_weights(model, mine)
        self.chunks = chunks  # one per stage of this rank: evaluation builds stages of them later
        # Losses are already divided by the step's global target count: no further scaling.
        self.train_schedule = self.schedule(SCHEDULES[self.cfg.schedule], self.new_stages(),
                                            self.cfg.n_microbatches, loss_fn=self.stage_loss,
                                            scale_grads=False)
        # (stages, schedule) by input shape, micro-batches and autocast; see forward_only
        self.eval_schedules: dict[tuple, tuple[list[PipelineStage], object]] = {}
        return mine

    def share_tied_weights(self, whole: nn.Module, mine: ModelSlice) -> None:
        """Find what this rank holds of a tied embedding, and the group of the ranks that hold it
        (made on every rank, as torch requires, even those outside it)."""
        tied = whole.head.weight is whole.token_embedding.weight
        ranks = self.placement.embedding_ranks()
        self.tied_group = dist.new_group(ranks) if tied and len(ranks) > 1 else None
        held = [p for p in mine.parameters() if p is whole.token_embedding.weight]
        self.tied = held if self.tied_group is not None else []
        # The last stage holds it as head.weight: its name in the whole model (and one
        # process's checkpoints) is the embedding's. The first stage counts it in the norm.
        names = {id(p): name for name, p in whole.named_parameters()}
        self.renamed = {name: names[id(p)] for name, p in mine.named_parameters()
                        if names[id(p)] != name}
        self.mirrors = {id(p) for name, p in mine.named_parameters() if name in self.renamed}

    def new_stages(self) -> list[PipelineStage]:
        """Fresh stages of this rank's chunks (they share the chunks' parameters)."""
        return [PipelineStage(chunk, s, self.n_stages, self.device)
                for chunk, s in zip(self.chunks, self.my_stages)]

    def schedule(self, schedule_class, stages: list[PipelineStage], n_microbatches: int, **options):
        stage_arg = stages if self.cfg.stages_per_rank > 1 else stages[0]
        return schedule_class(stage_arg, n_microbatches, **options)

    def stage_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The last stage's loss for one micro-batch, from its last hidden states through the
        model's own head and loss (``head_loss``), scaled for backward under fp16."""
        return self.precision.scale(self.loss_head.head_loss(hidden, targets, self.loss))

    # --- data -------------------------------------------------------------------------------
    def pad(self, batch: Batch) -> Batch:
        """Right-pad to the fixed length (padding is ignored by the loss and, the model being
        causal, cannot change the positions before it)."""
        extra = self.seq_len - batch.inputs.shape[1]
        if extra < 0:
            raise ValueError(f"a batch of length {batch.inputs.shape[1]} exceeds {self.seq_len}")
        return Batch(nn.functional.pad(batch.inputs, (0, extra), value=PAD),
                     nn.functional.pad(batch.targets, (0, extra), value=IGNORE_INDEX))

    # --- one step ---------------------------------------------------------------------------
    def forward_backward(self, model: nn.Module, micro_batches: list[Batch], loss: TokenLoss,
                         precision: Precision) -> torch.Tensor:
        # The schedule cuts the batch into its own micro-batches.
        batch = self.pad(Batch(torch.cat([m.inputs for m in micro_batches]),
                               torch.cat([m.targets for m in micro_batches]))).to(self.device)
        self.loss, self.precision = loss, precision
        losses: list[torch.Tensor] = []  # the last stage's, one per micro-batch
        args = (batch.inputs,) if self.is_first else ()
        targets = {"target": batch.targets, "losses": losses} if self.is_last else {}
        with precision.autocast():
            # Only the losses are needed: the last stage never makes the whole logits.
            self.train_schedule.step(*args, return_outputs=False, **targets)
        self.sum_tied_gradients()
        if not losses:
            return torch.zeros((), device=self.device)
        return precision.unscale_loss(torch.stack(losses).sum().detach())

    def sum_tied_gradients(self) -> None:
        """A tied matrix's gradient is the embedding's part (first stage) plus the head's
        (last stage): both ranks add them up, so both take the same update."""
        for param in self.tied:
            dist.all_reduce(param.grad, group=self.tied_group)

    def counted_in_norm(self, params: list[nn.Parameter]) -> list[nn.Parameter]:
        # A tied matrix's gradient, on two ranks, counts once: on the first stage's.
        return [p for p in params if id(p) not in self.mirrors]

    def global_norm(self, local_norm: torch.Tensor) -> torch.Tensor:
        # Each rank holds different parameters: add the squares of the stages' norms.
        squared = local_norm.to(self.device) ** 2
        dist.all_reduce(squared)
        return squared.sqrt()

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        # The last stage's copy of a tied matrix, and its optimizer state, take the whole
        # model's name, under which the first stage saves the same values: the checkpoint
        # holds them once, as one process's does.
        state = super().state_dict(model, optimizer)
        return {"model": {self.renamed.get(k, k): v for k, v in state["model"].items()},
                "optimizer": rename_optimizer_state(state["optimizer"], self.renamed)}

    def load_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                        state: dict) -> None:
        back = {new: old for old, new in self.renamed.items()}
        super().load_state_dict(model, optimizer, {
            "model": {back.get(k, k): v for k, v in state["model"].items()},
            "optimizer": rename_optimizer_state(state["optimizer"], back)})

    # --- evaluation -------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, run: Callable[[Forward], dict]) -> dict:
        """Every rank runs the whole evaluation in step (one pipeline: no data-parallel ranks to
        split it over); ``run(forward)``: a task's ``Evaluation``, or any function of a forward.
        Only the last stage has logits, so the others see a stand-in, and the last stage's
        results are shared with all. A loss is the model's own (``head_loss``) on the last
        stage's hidden states: as in training, the whole logits never exist."""
        def forward(inputs: torch.Tensor, targets: torch.Tensor | None = None,
                    loss: TokenLoss | None = None):
            hidden = self.forward_only(inputs)
            if targets is not None:
                if hidden is None:
                    return self.stand_in_loss(inputs, loss or TokenLoss())
                return self.loss_head.head_loss(hidden, targets.to(hidden.device), loss)
            if hidden is None:
                return torch.zeros(1, 1, 1, device=self.device).expand(*inputs.shape, self.vocab_size)
            return self.loss_head.logits(hidden)

        forward.takes_targets = True
        results = [run(forward)]
        dist.broadcast_object_list(results, src=self.last_rank, device=torch.device("cpu"))
        return results[0]

    def generate(self, model: nn.Module, run: Callable[[NextLogits], object]):
        """The last stage's next-token logits go to every rank, so that all draw the same
        token and the first stage feeds the right one back in."""
        def next_logits(inputs: torch.Tensor) -> torch.Tensor:
            hidden = self.forward_only(inputs)
            if hidden is None:
                last = torch.empty(len(inputs), self.vocab_size, device=self.device)
            else:  # the head on the last position only, as the whole model's last_only
                last = self.loss_head.logits(hidden[:, -1]).float().contiguous()
            dist.broadcast(last, src=self.last_rank)
            return last

        return run(next_logits)

    def stand_in_loss(self, inputs: torch.Tensor, loss: TokenLoss):
        """What ``loss`` returns, shaped for ``inputs``, on a rank without the head: a zero loss
        (and no hits). Only the last stage's results count (``evaluate`` shares them)."""
        zero = torch.zeros((), device=self.device)
        if not loss.hits:
            return zero
        return zero, torch.zeros(inputs.numel(), dtype=torch.bool, device=self.device)

    def forward_only(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """The last hidden states (before the final norm) of a (rows, length) batch of any
        shape on the last stage, None elsewhere. Every rank must call it with the same shape
        (they build the same schedules)."""
        rows, length = inputs.shape
        if length > self.seq_len:
            raise ValueError(f"a batch of length {length} exceeds {self.seq_len}")
        # As many micro-batches as rows allow (one row for sampling), of equal size.
        n_microbatches = min(self.cfg.n_microbatches, rows)
        padded = nn.functional.pad(inputs, (0, self.seq_len - length, 0, -rows % n_microbatches),
                                   value=PAD).to(self.device)
        stages, schedule = self.eval_schedule(padded, n_microbatches)
        out = schedule.step(*((padded,) if self.is_first else ()))
        for stage in stages:
            stage.clear_runtime_states()  # else the kept stages hold on to their outputs
        return out[:rows, :length] if self.is_last else None

    def eval_schedule(self, padded: torch.Tensor, n_microbatches: int):
        """Stages and a forward-only schedule for this input shape (and autocast), built on
        first use. Forwards alone run in GPipe's order whatever the training schedule (1F1B
        would also want at least as many micro-batches as stages)."""
        device_type = self.device.type
        key = (tuple(padded.shape), n_microbatches, torch.is_autocast_enabled(device_type),
               torch.get_autocast_dtype(device_type))
        if key not in self.eval_schedules:
            schedule_class = ScheduleLoopedBFS if self.cfg.stages_per_rank > 1 else ScheduleGPipe
            stages = self.new_stages()
            self.eval_schedules[key] = stages, self.schedule(schedule_class, stages, n_microbatches)
        return self.eval_schedules[key]


def rename_optimizer_state(state: dict, names: dict[str, str]) -> dict:
    """Flattened optimizer state (``state.<param>.exp_avg``, ``param_groups.<param>.lr``) with
    the parameters in ``names`` under their new names."""
    def new_key(key: str) -> str:
        kind, rest = key.split(".", 1)
        for old, new in names.items():
            if rest.startswith(f"{old}."):
                return f"{kind}.{new}{rest[len(old):]}"
        return key

    return {new_key(key): value for key, value in state.items()} if names else state
