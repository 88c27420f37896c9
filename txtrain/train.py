"""The Trainer: builds a run from its config, then loops
micro-batches -> loss -> backward -> clip -> step -> log / eval / save.

Everything that depends on the parallel strategy goes through ``self.strategy``; everything
that depends on precision goes through ``self.precision``. The loop itself never branches on
either.
"""

from __future__ import annotations

import gc
import json
import math
import random
import time
from pathlib import Path

import torch

from txtrain.allocator import keep_freed_memory, return_freed_memory
from txtrain.checkpoint import Checkpoints, SaveFailed
from txtrain.config import Config, ConfigError, ModelConfig, TrainingStopped
from txtrain.distributed import decided_by_rank_0
from txtrain.early_stop import EarlyStopping
from txtrain.generate import complete
from txtrain.metrics import RunLog, Speed
from txtrain.model import build_model, model_class
from txtrain.model.chunked_loss import TokenLoss
from txtrain import planner
from txtrain.memory import PeakMemory, held_bytes
from txtrain.optim import build_optimizer, lr_factor, per_parameter_state, set_lr
from txtrain.parallel import build_strategy
from txtrain.precision import Precision
from txtrain.resume import (CheckpointMeta, config_hash, find_resume_point, finished_result,
                            load_model_and_optimizer, plain, run_config, schedule_change)
from txtrain.rng import capture_rng, restore_rank_rng
from txtrain.runinfo import process_age, run_identity
from txtrain.stopping import Interrupted, StopRequests
from txtrain.tasks import IGNORE_INDEX, Batch, Task, build_task


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.task: Task = build_task(cfg.task, cfg.seed, cfg.progress, model_class(cfg.model))
        check_model_fits_task(cfg.model, self.task)
        self.strategy = build_strategy(cfg, self.task.max_seq_len)
        self.device = self.strategy.device
        if self.device.type == "cpu" and cfg.keep_freed_memory:  # big tensors come and go every step
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
                                       self.strategy.gather, cfg.train.keep_last)
        self.step = 0
        self.tokens = 0  # target tokens consumed so far, all ranks
        self.last_loss = float("nan")  # the latest logged training loss
        self.last_eval: dict = {}
        self.skipped_steps = 0  # steps not taken: non-finite loss or gradients
        self.nonfinite_in_a_row = 0
        self.early_stop = EarlyStopping(self.task.main_metric, cfg.train.patience, cfg.train.min_delta)
        self.resume_warnings: list[str] = []  # damaged checkpoints passed over, config changes
        self.resumed_from = self.resume()
        self.first_step = self.step

    # --- the loop ---------------------------------------------------------------------------
    def fit(self) -> dict:
        train = self.cfg.train
        if (finished := finished_result(self.run_dir, self.strategy, self.step, train.steps,
                                        self.early_stop.should_stop)) is not None:
            return finished
        log = self.open_log()
        started, tokens_at_start = time.perf_counter(), self.tokens
        speed = Speed(self.tokens, self.step)
        with StopRequests(train.stop_signal) as stop:  # SIGTERM, Ctrl-C: save, then leave
            while self.step < train.steps and not self.early_stop.should_stop:
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

                # Every step, before anything slow (a launcher's grace period is short). Under
                # several ranks it waits for this step's work on the device: training time.
                if stop.agreed(self.device):
                    self.stop_here(log, stop.received)
                with speed.paused():  # evaluation and saving are not training
                    if self.step == train.steps:  # no step follows to reuse freed memory
                        return_freed_memory()
                    if is_due(self.step, train.eval_every, train.steps):
                        self.evaluate(log)
                    best_or_last = self.early_stop.wants_checkpoint(self.step)  # (train.patience)
                    if best_or_last or is_due(self.step, train.save_every, train.steps):
                        self.save(log)
        if self.step < train.steps:  # early stopping ended the loop: before the plot, at least
            return_freed_memory()
        if self.last_eval.get("step") != self.step:  # a run resumed at its last step
            self.evaluate(log)
            if self.early_stop.wants_checkpoint(self.step):
                self.save(log)
        self.report_early_stop(log)
        self.report_memory(log)
        seconds = time.perf_counter() - started
        summary = {**self.last_eval, "step": self.step, "loss": self.last_loss,
                   "tokens": self.tokens, "seconds": seconds,
                   "tokens_per_s": (self.tokens - tokens_at_start) / seconds}
        self.finish(log, summary)
        return summary

    def open_log(self) -> RunLog:
        """The run's log. The main rank opens the run's outputs and loggers and reports the start
        (the others write none of it: no memory report, no git lookups); should that fail (a
        logger that cannot start, a file that cannot be written), every rank stops alike, rather
        than the others waiting in the first step for a rank that has left."""
        main = self.strategy.is_main
        log = None

        def start() -> None:  # on rank 0 (on each rank where no process group joins them)
            nonlocal log
            log = RunLog(self.run_dir, main, self.cfg.progress, self.step, self.cfg.train.steps,
                         loggers=self.cfg.logger, config=plain(self.cfg))
            if main:
                self.announce(log)
                log.run_info(**run_identity(self.strategy.world_size, self.device))

        decided_by_rank_0(start)
        if log is None:  # a rank that does not write
            start()
        return log

    def stop_here(self, log: RunLog, signal_name: str) -> None:
        """Asked to stop: save this step and leave (``Interrupted``)."""
        saved = self.save(log)
        log.close()
        raise Interrupted(self.step, signal_name, saved, self.checkpoints.latest())

    def report_early_stop(self, log: RunLog) -> None:
        """Under train.patience: why the run stopped, if it stopped early, and its best
        evaluation (the checkpoint ``best`` names), into the log and run.json."""
        if not self.early_stop.enabled:
            return
        stopped_early = self.step < self.cfg.train.steps  # the loop ends early only for this
        if stopped_early:
            log.info(self.early_stop.describe_stop(self.step))
        log.run_info(stopped_early=stopped_early, **self.early_stop.record())

    def finish(self, log: RunLog, summary: dict) -> None:
        """The result into run.json, and the curves into loss.png (``plot``)."""
        log.run_info(result={k: finite_or_none(v) if isinstance(v, float) else v
                             for k, v in summary.items()})
        log.close()
        if self.strategy.is_main and self.cfg.plot:
            try:
                from txtrain.plots import plot_run

                log.guarded("loss.png", lambda: plot_run(self.run_dir))
            except ImportError as missing:
                log.info(f"no loss.png: {missing}")

    def train_step(self, batch: Batch, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer update over the global batch; returns (loss, grad norm)."""
        set_lr(self.optimizer, lr)
        # Every rank knows the global count: losses are sums / it. The model computes them
        # through its head, chunk by chunk (model/chunked_loss.py).
        loss_fn = TokenLoss(self.cfg.train.label_smoothing, self.cfg.train.loss_chunk_tokens,
                            divide_by=batch.n_targets, ignore_index=IGNORE_INDEX,
                            skip_ignored=batch.n_targets < batch.targets.numel())  # known on the host
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
        """A step with a non-finite loss or gradient. Gradients that overflow under fp16 are
        loss scaling at work: the scaler skips the step and lowers the scale. Anything else (a
        non-finite loss, in any precision) stops the run, unless train.skip_nonfinite allows
        skipping (and then it stops after that many in a row)."""
        self.skipped_steps += 1
        if self.precision.absorb_overflow(self.optimizer, loss):
            return
        self.nonfinite_in_a_row += 1
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
        with self.peak_memory.paused(), self.precision.autocast():  # not a training step's memory
            # the strategy splits the held-out batches over the data-parallel ranks
            results = self.strategy.evaluate(self.model, self.task.evaluation(self.cfg.train.eval_batch_size))
            samples = self.generate_samples()
        self.model.train()
        self.last_eval = {"step": self.step, **results}
        self.early_stop.update(self.step, results)
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

    def close(self) -> None:
        """Free the model and optimizer, then end the process group. A DDP wrapper holds the
        group: freed after ``destroy_process_group``, it would free the group itself, from
        Python with the interpreter lock held, while the group's worker threads may need that
        lock to finish (a rank was seen hanging there after its run had ended)."""
        self.model = self.optimizer = None
        gc.collect()  # the trainer's own reference cycles hold them too
        self.strategy.close()

    # --- checkpoints ------------------------------------------------------------------------
    def save(self, log: RunLog) -> Path | None:
        """A checkpoint; one that fails to save (a full disk) is reported and training goes on.
        Every rank ends the same way. Returns the checkpoint, None if it failed."""
        def warn(line: str) -> None:
            log.info(f"warning: {line}")

        try:
            with self.peak_memory.paused():  # not a training step's memory
                return self.write_checkpoint(warn)
        except SaveFailed as failure:
            warn(str(failure))
            return None

    def write_checkpoint(self, warn=lambda line: None) -> Path:
        meta = CheckpointMeta(
            step=self.step, tokens=self.tokens,
            rng=self.strategy.gather(capture_rng(self.strategy.rng_devices)),  # one per rank
            last_loss=self.last_loss, last_eval=self.last_eval, skipped_steps=self.skipped_steps,
            nonfinite_in_a_row=self.nonfinite_in_a_row, schedule_steps=self.cfg.train.steps,
            precision=self.precision.state_dict(), model_config=plain(self.cfg.model),
            run_config=self.run_config, config_hash=config_hash(self.run_config),
            vocab_size=self.task.vocab_size, codec=self.task.codec.state(),
            early_stopping=self.early_stop.state_dict(), context=self.task.max_seq_len)
        state = self.strategy.state_dict(self.model, self.optimizer)
        # Not the param groups' hyperparameters: a resume keeps its own (the run config in the
        # meta says what they were), and as one entry per parameter and setting they were
        # three quarters of a small model's entries, and half its time to save.
        state["optimizer"] = per_parameter_state(state["optimizer"])
        return self.checkpoints.save(self.step, state, meta.as_dict(), warn, meta.config_hash,
                                     best_step=self.early_stop.best_step)

    def resume(self) -> Path | None:
        """Continue from the checkpoint that cfg.resume finds, if any: its weights, optimizer
        state, counters and each rank's random stream (``txtrain.resume``)."""
        found = find_resume_point(self.cfg, self.run_dir, self.checkpoints, self.strategy,
                                  self.task.vocab_size, self.resume_warnings.append)
        if found is None:
            return None
        path, meta = found
        self.optimizer = load_model_and_optimizer(path, meta, self.cfg, self.strategy, self.model,
                                                  self.optimizer, self.resume_warnings.append)
        self.step, self.tokens, self.last_loss = meta.step, meta.tokens, meta.last_loss
        self.last_eval, self.skipped_steps, self.nonfinite_in_a_row = (meta.last_eval, meta.skipped_steps,
                                                                       meta.nonfinite_in_a_row)
        self.precision.load_state_dict(meta.precision)
        if self.cfg.resume == "auto":  # a checkpoint named by path: its best is another run dir's
            self.early_stop.load_state_dict(meta.early_stopping)
        restore_rank_rng(meta.rng, self.strategy.rank, self.cfg.seed, self.step, self.strategy.rng_devices)
        self.resume_warnings += schedule_change(self.cfg, meta)
        return path

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
        for line in [*self.strategy.warnings, *self.resume_warnings]:
            log.info(f"warning: {line}")
        if self.resumed_from is not None:
            log.info(f"resumed from {self.resumed_from} at step {self.step}")
        log.info(f"run dir: {self.run_dir}")

    def report_memory(self, log: RunLog) -> None:
        """The plan next to what each rank held and the peak it reached; also memory.json."""
        mine = {"rank": self.strategy.rank, "planned": self.plans[self.strategy.rank].as_dict(), "held": self.held,
                "measured_peak": self.peak_memory.bytes(), "measured_by": self.peak_memory.method,
                "baseline": self.peak_memory.baseline}  # held before the model was built
        everyone = self.strategy.gather(mine)
        if not self.strategy.is_main:
            return
        log.scalars("memory", {"step": self.step, **{f"rank{r['rank']}_peak_bytes": r["measured_peak"]
                                                     for r in everyone}})
        for rank in everyone:
            before = "" if rank["measured_by"].startswith("torch.cuda") else \
                f"; {planner.gib(rank['baseline'])} held before the model"
            log.info(f"memory rank {rank['rank']}: peak {planner.gib(rank['measured_peak'])} "
                     f"measured ({rank['measured_by']}{before}), "
                     f"{planner.gib(rank['planned']['peak'])} planned")
        memory = json.dumps(everyone, indent=1) + "\n"
        log.guarded("memory.json", lambda: (self.run_dir / "memory.json").write_text(memory))


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
    return model_class(model).describe(model)


def check_model_fits_task(model: ModelConfig, task: Task) -> None:
    if model.pos == "learned" and task.max_seq_len > model.max_seq_len:
        raise ConfigError(f"the task's sequences reach {task.max_seq_len} tokens but the learned "
                          f"position table has model.max_seq_len={model.max_seq_len}; raise "
                          "model.max_seq_len, shorten the task, or use model.pos=sinusoidal/rope")
