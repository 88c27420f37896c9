"""The Trainer: builds a run from its config, then loops
micro-batches -> loss -> backward -> clip -> step -> log / eval / save.

Everything that depends on the parallel strategy goes through ``self.strategy``; everything
that depends on precision goes through ``self.precision``. The loop itself never branches on
either.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from txtrain.allocator import keep_freed_memory
from txtrain.checkpoint import (Checkpoints, SaveFailed, capture_rng, find_checkpoint, load_meta,
                                load_state, restore_rng)
from txtrain.compat import check_same_model, check_same_run, config_hash, plain, run_config
from txtrain.config import Config, ConfigError, ModelConfig, TrainingStopped
from txtrain.generate import complete
from txtrain.metrics import RunLog, Speed
from txtrain.model import build_model
from txtrain import planner
from txtrain.memory import PeakMemory, held_bytes
from txtrain.optim import build_optimizer, lr_factor, set_lr
from txtrain.parallel import build_strategy
from txtrain.precision import Precision
from txtrain.runinfo import process_age, run_identity
from txtrain.stopping import Interrupted, StopRequests
from txtrain.tasks import IGNORE_INDEX, Batch, Task, build_task


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.task: Task = build_task(cfg.task, cfg.seed, cfg.progress, cfg.model.arch == "encoder_decoder")
        check_model_fits_task(cfg.model, self.task)
        self.strategy = build_strategy(cfg, self.task.max_seq_len)
        self.device = self.strategy.device
        if self.device.type == "cpu":  # big tensors come and go every step: keep their memory
            keep_freed_memory()
        self.micro_batch_size = self.strategy.micro_batch_size(cfg.train.batch_size,
                                                               cfg.train.micro_batch_size)
        self.peak_memory = PeakMemory(self.device)  # before the model: its baseline
        self.layout = planner.Layout(self.strategy.world_size, self.task.vocab_size,
                                     self.task.max_seq_len, self.device.type)
        self.plans = planner.plan_memory(cfg, self.layout)  # every rank's
        self.held: dict | None = None  # bytes of the model and optimizer, after the first update
        seed_everything(cfg.seed)  # every rank builds the same initial weights
        model = build_model(cfg.model, self.task.vocab_size)
        self.n_params = model.num_parameters()
        if cfg.compile:  # block by block, before any wrapping: works under every strategy
            for block in model.blocks.values():
                block.compile()
        self.model = self.strategy.prepare(model)
        if self.strategy.world_size > 1:  # the same weights everywhere, but each rank its own dropout
            torch.manual_seed(cfg.seed + self.strategy.rank)
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device)
        self.precision = Precision(cfg.precision, self.device, self.strategy.world_size)
        self.run_config = run_config(cfg)  # what a checkpoint of this run must agree with to resume
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", self.strategy.is_main,
                                       self.strategy.barrier, cfg.train.keep_last)
        self.step = 0
        self.tokens = 0  # target tokens consumed so far, all ranks
        self.last_loss = float("nan")  # the latest logged training loss
        self.last_eval: dict = {}
        self.skipped_steps = 0  # steps not taken: non-finite loss or gradients
        self.nonfinite_in_a_row = 0
        self.resume_warnings: list[str] = []  # damaged checkpoints passed over, config changes
        self.resumed_from = self.resume()
        self.first_step = self.step

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        train = self.cfg.train
        log = RunLog(self.run_dir, self.strategy.is_main, self.cfg.progress, self.step, train.steps,
                     tensorboard=self.cfg.logger == "tensorboard")
        self.announce(log)
        log.text("config", OmegaConf.to_yaml(OmegaConf.structured(self.cfg)))
        log.run_info(**run_identity(self.strategy.world_size, self.device))
        started, tokens_at_start = time.perf_counter(), self.tokens
        speed = Speed(self.tokens, self.step)
        with StopRequests(train.stop_signal) as stop:  # SIGTERM, Ctrl-C: save, then leave
            while self.step < train.steps:
                data_step = 0 if self.cfg.debug.overfit_batch else self.step
                with speed.waiting_for_data():
                    batch = self.task.train_batch(data_step, train.batch_size)
                lr = self.cfg.optim.lr * lr_factor(self.cfg.schedule, self.step, train.steps)
                loss, grad_norm = self.train_step(batch, lr)
                self.step += 1
                self.tokens += batch.n_targets

                record = None
                if self.step % train.log_every == 0 or self.step == train.steps:
                    self.last_loss = loss.item()
                    record = {"step": self.step, "loss": finite_or_none(self.last_loss), "lr": lr,
                              "grad_norm": finite_or_none(grad_norm.item()), "tokens": self.tokens,
                              **speed.measure(self.tokens, self.step),
                              "skipped_steps": self.skipped_steps, **self.precision.metrics()}
                log.step(record)
                if self.step == self.first_step + 1:
                    self.after_first_step(log, speed)

                with self.peak_memory.paused(), speed.paused():  # evaluation and saving are not training
                    if is_due(self.step, train.eval_every, train.steps):
                        self.evaluate(log)
                    if is_due(self.step, train.save_every, train.steps):
                        self.save(log)
                    if stop.agreed(self.device):
                        self.stop_here(log, stop.received)
        if self.last_eval.get("step") != self.step:  # a run resumed at its last step
            self.evaluate(log)
        self.report_memory(log)
        seconds = time.perf_counter() - started
        summary = {**self.last_eval, "step": self.step, "loss": self.last_loss,
                   "tokens": self.tokens, "seconds": seconds,
                   "tokens_per_s": (self.tokens - tokens_at_start) / seconds}
        self.finish(log, summary)
        return summary

    def stop_here(self, log: RunLog, signal_name: str) -> None:
        """Asked to stop: save this step and leave (``Interrupted``)."""
        self.save(log)
        log.close()
        raise Interrupted(self.step, signal_name, self.checkpoints.latest())

    def finish(self, log: RunLog, summary: dict) -> None:
        """The result into run.json, and the curves into loss.png."""
        log.run_info(result={k: finite_or_none(v) if isinstance(v, float) else v
                             for k, v in summary.items()})
        log.close()
        if self.strategy.is_main:
            try:
                from txtrain.plots import plot_run

                plot_run(self.run_dir)
            except ImportError as missing:
                log.info(f"no loss.png: {missing}")

    def train_step(self, batch: Batch, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer update over the global batch; returns (loss, grad norm)."""
        set_lr(self.optimizer, lr)
        n_targets = batch.n_targets  # every rank knows the global count: losses are sums / it
        smoothing = self.cfg.train.label_smoothing
        poison = float("nan") if self.step + 1 in self.cfg.debug.nonfinite_steps else 1.0

        def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return poison * F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                            ignore_index=IGNORE_INDEX, reduction="sum",
                                            label_smoothing=smoothing) / n_targets

        micro_batches = self.strategy.local_batch(batch).split(self.micro_batch_size)
        loss = self.strategy.forward_backward(self.model, micro_batches, loss_fn, self.precision)
        loss = self.strategy.reduce_sum(loss)
        self.precision.unscale(self.optimizer)
        grad_norm = self.strategy.clip_grad_norm(self.model, self.cfg.train.grad_clip)
        # The loop waits here for the device, once per step: a step must not be taken blindly.
        if bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            self.nonfinite_in_a_row = 0
            self.precision.step(self.optimizer)
        else:
            self.skip_step(loss, grad_norm)
        if self.held is None:  # once, while gradients and optimizer state both exist
            self.held = held_bytes(self.model, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def skip_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        """A step with a non-finite loss or gradient. Under fp16 that is loss scaling at work:
        the scaler skips it and lowers the scale. Otherwise stop, unless train.skip_nonfinite
        allows skipping (and then stop after that many in a row)."""
        self.skipped_steps += 1
        self.nonfinite_in_a_row += 1
        if self.precision.absorb_overflow(self.optimizer):
            return
        allowed = self.cfg.train.skip_nonfinite
        if self.nonfinite_in_a_row > allowed or allowed == 0:
            latest = self.checkpoints.latest()
            raise TrainingStopped(
                f"step {self.step + 1}: the loss is {loss.item()} and the gradient norm "
                f"{grad_norm.item()}" + (f" ({self.nonfinite_in_a_row} steps in a row)" if allowed else "")
                + f"; stopped. Last good checkpoint: {latest or 'none yet'}. Lower optim.lr, raise "
                "schedule.warmup_steps, or skip such steps with train.skip_nonfinite=K")

    def after_first_step(self, log: RunLog, speed: Speed) -> None:
        """Record how long start-up took. Under compile=true the first step is mostly
        compiling: report it on its own and start measuring speed after it."""
        log.run_info(startup_s=process_age())
        if self.cfg.compile:
            log.info(f"compile: the first step took {time.perf_counter() - speed.started:.1f}s "
                     "(compiling included)")
            speed.restart(self.tokens, self.step)

    @torch.no_grad()
    def evaluate(self, log: RunLog) -> dict:
        self.model.eval()
        with self.precision.autocast():
            results = self.strategy.evaluate(
                self.model, lambda forward: self.task.evaluate(forward, self.cfg.train.eval_batch_size))
            samples = self.generate_samples()
        self.model.train()
        self.last_eval = {"step": self.step, **results}
        log.eval(self.last_eval)
        log.samples(self.step, samples)
        return self.last_eval

    def generate_samples(self) -> list[tuple[str, str]]:
        """The task's sampling prompts and their continuations (every rank draws the same)."""
        sampling = self.task.sampling
        if sampling is None:
            return []
        return self.strategy.generate(self.model, lambda next_logits: [
            (prompt, complete(next_logits, self.task.codec, prompt, sampling, self.cfg.seed + i,
                              context=self.task.max_seq_len))
            for i, prompt in enumerate(sampling.prompts)])

    # --- checkpoints ------------------------------------------------------------------------
    def save(self, log: RunLog) -> None:
        """A checkpoint; one that fails to save (a full disk) is reported and training goes on."""
        try:
            self.write_checkpoint()
        except SaveFailed as failure:
            log.info(f"warning: {failure}")

    def write_checkpoint(self) -> None:
        meta = {
            "step": self.step,
            "tokens": self.tokens,
            "rng": self.strategy.gather(capture_rng()),  # one per rank
            "last_loss": self.last_loss,
            "last_eval": self.last_eval,
            "skipped_steps": self.skipped_steps,
            "precision": self.precision.state_dict(),
            "model_config": plain(self.cfg.model),
            "run_config": self.run_config,
            "config_hash": config_hash(self.run_config),
            "vocab_size": self.task.vocab_size,
            "codec": self.task.codec.state(),  # sampling needs no data, only the checkpoint
        }
        self.checkpoints.save(self.step, self.strategy.state_dict(self.model, self.optimizer), meta)

    def resume(self) -> Path | None:
        if self.cfg.resume == "never":
            self.start_over()
        path = find_checkpoint(self.cfg.resume, self.run_dir, log=self.resume_warnings.append)
        if path is None:
            return None
        meta = load_meta(path)
        check_same_model(meta, plain(self.cfg.model), self.task.vocab_size, path)
        self.resume_warnings += check_same_run(meta, self.run_config, path, explicit=self.cfg.resume != "auto")
        state = self.strategy.state_dict(self.model, self.optimizer)
        load_state(path, state)
        self.strategy.load_state_dict(self.model, self.optimizer, state)
        self.step, self.tokens = meta["step"], meta["tokens"]
        self.last_loss, self.last_eval = meta["last_loss"], meta["last_eval"]
        self.skipped_steps = meta["skipped_steps"]
        self.precision.load_state_dict(meta["precision"])
        # Each rank continues its own random stream; under a new world size, rank 0's.
        rng = meta["rng"]
        restore_rng(rng[self.strategy.rank] if len(rng) == self.strategy.world_size else rng[0])
        return path

    def start_over(self) -> None:
        """resume=never in a run dir that holds another run's checkpoints: refuse, unless
        overwrite=true, which deletes them and the logs that go with them."""
        earlier = self.checkpoints.saved()
        if not earlier:
            return
        if not self.cfg.overwrite:
            raise ConfigError(f"{self.run_dir} already holds a run's checkpoints ({earlier[-1].name} "
                              "and maybe more); continue it with resume=auto, start over there with "
                              "resume=never overwrite=true (deletes them), or choose another hydra.run.dir")
        self.strategy.barrier()  # every rank has looked before anything goes
        if self.strategy.is_main:
            shutil.rmtree(self.checkpoints.directory)
            for name in ("metrics.jsonl", "eval.jsonl", "samples.txt"):
                (self.run_dir / name).unlink(missing_ok=True)
        self.strategy.barrier()

    def announce(self, log: RunLog) -> None:
        train = self.cfg.train
        log.info(f"model: {self.n_params:,} parameters ({self.n_params / 1e6:.2f}M), "
                 f"{describe_layers(self.cfg.model)}, {self.cfg.model.n_head} heads, "
                 f"width {self.cfg.model.n_embd}, pos {self.cfg.model.pos}, "
                 f"attention {self.cfg.model.impl}")
        log.info(self.task.describe())
        accumulation = train.batch_size // (self.micro_batch_size * self.strategy.data_parallel_size)
        log.info(f"parallel {self.strategy.describe()}, precision {self.precision.name}, "
                 f"batch {train.batch_size} = {self.micro_batch_size} x {accumulation} accumulation"
                 f" x {self.strategy.data_parallel_size} ranks, {train.steps} steps")
        budget = self.cfg.plan.device_memory_gb or planner.device_memory_gb(self.device)
        for line in planner.report(self.cfg, self.layout, self.plans, budget):
            log.info(line)
        for line in self.resume_warnings:
            log.info(f"warning: {line}")
        if self.resumed_from is not None:
            log.info(f"resumed from {self.resumed_from} at step {self.step}")
        log.info(f"run dir: {self.run_dir}")

    def report_memory(self, log: RunLog) -> None:
        """The plan next to what each rank held and the peak it reached; also memory.json."""
        mine = {"rank": self.strategy.rank, "planned": self.plans[self.strategy.rank].as_dict(), "held": self.held,
                "measured_peak": self.peak_memory.bytes(), "measured_by": self.peak_memory.method}
        everyone = self.strategy.gather(mine)
        if not self.strategy.is_main:
            return
        log.scalars("memory", {"step": self.step, **{f"rank{r['rank']}_peak_bytes": r["measured_peak"]
                                                     for r in everyone}})
        for rank in everyone:
            log.info(f"memory rank {rank['rank']}: peak {planner.gib(rank['measured_peak'])} "
                     f"measured ({rank['measured_by']}), {planner.gib(rank['planned']['peak'])} "
                     "planned")
        (self.run_dir / "memory.json").write_text(json.dumps(everyone, indent=1) + "\n")


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN or infinity: a non-finite number is written as null."""
    return value if math.isfinite(value) else None


def is_due(step: int, every: int, last_step: int) -> bool:
    """True every ``every`` steps (0: never) and always at the last step."""
    return step == last_step or (every > 0 and step % every == 0)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def describe_layers(model: ModelConfig) -> str:
    if model.arch == "encoder_decoder":
        return f"encoder-decoder, {model.n_encoder_layer or model.n_layer}+{model.n_layer} layers"
    return f"{model.n_layer} layers"


def check_model_fits_task(model: ModelConfig, task: Task) -> None:
    if model.pos == "learned" and task.max_seq_len > model.max_seq_len:
        raise ConfigError(f"the task's sequences reach {task.max_seq_len} tokens but the learned "
                          f"position table has model.max_seq_len={model.max_seq_len}; raise "
                          "model.max_seq_len, shorten the task, or use model.pos=sinusoidal/rope")
