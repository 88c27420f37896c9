"""The Trainer: builds a run from its config, then loops
micro-batches -> loss -> backward -> clip -> step -> log / eval / save.

Everything that depends on the parallel strategy goes through ``self.strategy``; everything
that depends on precision goes through ``self.precision``. The loop itself never branches on
either.
"""

from __future__ import annotations

import dataclasses
import random
import time
from enum import Enum
from pathlib import Path

import torch
import torch.nn.functional as F

from txtrain.checkpoint import Checkpoints, capture_rng, find_checkpoint, load_state, restore_rng
from txtrain.config import Config, ConfigError, ModelConfig
from txtrain.metrics import RunLog
from txtrain.model import Transformer
from txtrain.optim import build_optimizer, lr_factor, set_lr
from txtrain.parallel import build_strategy
from txtrain.precision import Precision
from txtrain.tasks import IGNORE_INDEX, Batch, Task, build_task


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.strategy = build_strategy(cfg)
        self.device = self.strategy.device
        seed_everything(cfg.seed)
        self.task: Task = build_task(cfg.task, cfg.seed)
        check_model_fits_task(cfg.model, self.task)
        model = Transformer(cfg.model, self.task.vocab_size)
        self.n_params = model.num_parameters()
        self.model = self.strategy.prepare(model)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.precision = Precision(cfg.precision, self.device)
        self.micro_batch_size = self.strategy.micro_batch_size(cfg.train.batch_size,
                                                               cfg.train.micro_batch_size)
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints")
        self.step = 0
        self.tokens = 0  # target tokens consumed so far, all ranks
        self.last_loss = float("nan")  # the latest logged training loss
        self.last_eval: dict = {}
        self.resumed_from = self.resume()

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        train = self.cfg.train
        log = RunLog(self.run_dir, self.strategy.is_main, self.cfg.progress, self.step, train.steps)
        self.announce(log)
        started = clock = time.perf_counter()
        tokens_at_clock = self.tokens
        while self.step < train.steps:
            data_step = 0 if self.cfg.debug.overfit_batch else self.step
            batch = self.task.train_batch(data_step, train.batch_size)
            lr = self.cfg.optim.lr * lr_factor(self.cfg.schedule, self.step, train.steps)
            loss, grad_norm = self.train_step(batch, lr)
            self.step += 1
            self.tokens += batch.n_targets

            record = None
            if self.step % train.log_every == 0 or self.step == train.steps:
                now = time.perf_counter()
                self.last_loss = loss.item()  # the only place the loop waits for the device
                record = {"step": self.step, "loss": self.last_loss, "lr": lr,
                          "grad_norm": grad_norm.item(), "tokens": self.tokens,
                          "tokens_per_s": (self.tokens - tokens_at_clock) / (now - clock)}
                clock, tokens_at_clock = now, self.tokens
            log.step(record)

            paused = time.perf_counter()
            if is_due(self.step, train.eval_every, train.steps):
                self.evaluate(log)
            if is_due(self.step, train.save_every, train.steps):
                self.save()
            clock += time.perf_counter() - paused  # evaluation and saving are not training speed
        if self.last_eval.get("step") != self.step:  # a run resumed at its last step
            self.evaluate(log)
        log.close()
        return {"step": self.step, "loss": self.last_loss, "tokens": self.tokens,
                "seconds": time.perf_counter() - started, **self.last_eval}

    def train_step(self, batch: Batch, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer update over the global batch; returns (loss, grad norm) as tensors,
        so nothing waits for the device unless the caller asks for the numbers."""
        set_lr(self.optimizer, lr)
        n_targets = batch.n_targets  # every rank knows the global count: losses are sums / it
        smoothing = self.cfg.train.label_smoothing

        def micro_step(micro: Batch) -> torch.Tensor:
            with self.precision.autocast():
                logits = self.model(micro.inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), micro.targets.flatten(),
                                   ignore_index=IGNORE_INDEX, reduction="sum",
                                   label_smoothing=smoothing) / n_targets
            self.precision.backward(loss)
            return loss.detach()

        micro_batches = self.strategy.local_batch(batch).split(self.micro_batch_size)
        loss = self.strategy.forward_backward(self.model, micro_batches, micro_step)
        grad_norm = self.strategy.clip_grad_norm(self.model, self.cfg.train.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.strategy.reduce_sum(loss), grad_norm

    @torch.no_grad()
    def evaluate(self, log: RunLog) -> dict:
        self.model.eval()
        with self.precision.autocast():
            results = self.task.evaluate(lambda inputs: self.model(inputs.to(self.device)),
                                         self.cfg.train.eval_batch_size)
        self.model.train()
        self.last_eval = {"step": self.step, **results}
        log.eval(self.last_eval)
        return self.last_eval

    # --- checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        state = {
            "step": self.step,
            "tokens": self.tokens,
            "model": self.strategy.model_state_dict(self.model),
            "optimizer": self.strategy.optimizer_state_dict(self.model, self.optimizer),
            "rng": capture_rng(),
            "last_loss": self.last_loss,
            "last_eval": self.last_eval,
            "model_config": plain(self.cfg.model),
            "vocab_size": self.task.vocab_size,
        }
        if self.strategy.is_main:
            self.checkpoints.save(self.step, state)
        self.strategy.barrier()

    def resume(self) -> Path | None:
        path = find_checkpoint(self.cfg.resume, self.run_dir)
        if path is None:
            return None
        state = load_state(path)
        check_compatible(state, plain(self.cfg.model), self.task.vocab_size, path)
        self.strategy.load_model_state_dict(self.model, state["model"])
        self.strategy.load_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.last_loss, self.last_eval = state["last_loss"], state["last_eval"]
        restore_rng(state["rng"])
        return path

    def announce(self, log: RunLog) -> None:
        train = self.cfg.train
        log.info(f"model: {self.n_params:,} parameters ({self.n_params / 1e6:.2f}M), "
                 f"{self.cfg.model.n_layer} layers, {self.cfg.model.n_head} heads, "
                 f"width {self.cfg.model.n_embd}, pos {self.cfg.model.pos}, "
                 f"attention {self.cfg.model.impl}")
        log.info(self.task.describe())
        accumulation = train.batch_size // (self.micro_batch_size * self.strategy.data_parallel_size)
        log.info(f"parallel {self.strategy.describe()}, precision {self.precision.name}, "
                 f"batch {train.batch_size} = {self.micro_batch_size} x {accumulation} accumulation"
                 f" x {self.strategy.data_parallel_size} ranks, {train.steps} steps")
        if self.resumed_from is not None:
            log.info(f"resumed from {self.resumed_from} at step {self.step}")
        log.info(f"run dir: {self.run_dir}")


def is_due(step: int, every: int, last_step: int) -> bool:
    """True every ``every`` steps (0: never) and always at the last step."""
    return step == last_step or (every > 0 and step % every == 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def plain(cfg) -> dict:
    """A dataclass config as plain JSON-able values (enums as their names)."""
    return {k: v.value if isinstance(v, Enum) else v for k, v in dataclasses.asdict(cfg).items()}


def check_model_fits_task(model: ModelConfig, task: Task) -> None:
    if model.pos == "learned" and task.max_seq_len > model.max_seq_len:
        raise ConfigError(f"the task's sequences reach {task.max_seq_len} tokens but the learned "
                          f"position table has model.max_seq_len={model.max_seq_len}; raise "
                          "model.max_seq_len, shorten the task, or use model.pos=sinusoidal/rope")


RUNTIME_ONLY = {"dropout", "impl"}  # model settings that do not change the weights


def check_compatible(state: dict, model_config: dict, vocab_size: int, path: Path) -> None:
    saved = dict(state["model_config"], vocab_size=state["vocab_size"])
    wanted = dict(model_config, vocab_size=vocab_size)
    differ = [f"{k} {saved.get(k)} -> {wanted.get(k)}" for k in sorted(wanted)
              if k not in RUNTIME_ONLY and saved.get(k) != wanted.get(k)]
    if differ:
        raise ConfigError(f"checkpoint {path} was written by a different model ({', '.join(differ)}); "
                          "use the same model settings, resume=never, or another hydra.run.dir")
