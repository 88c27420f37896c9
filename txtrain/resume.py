"""Resuming a run: what a checkpoint records besides its tensors (``CheckpointMeta``), whether
this run may continue it, and loading it; starting over in a run dir without a trace of the old
run; and the same command run again after its run finished.

Before anything is loaded or written, a checkpoint must share with the run that resumes it:

- the **model** (its weights would not fit otherwise), whichever way the checkpoint was found;
- the rest of the **run's config** too when resuming a run dir's own checkpoints
  (``resume=auto``): the task, optimizer, schedule, batch, seed and precision make the run what
  it is, and a rerun with another learning rate in the same dir is a mistake, not a
  continuation. Settings that only say how long, how often, where or with how many processes
  (``train.steps``, ``parallel``, ``device``, ...) may change. A checkpoint named by path
  (``resume=<path>``) carries its weights into a different config on purpose: the differences
  are reported, not refused.

The config that counts is also hashed into the checkpoint's manifest. A resume takes the
weights, the optimizer's state, the counters and each rank's random stream from the checkpoint,
and the optimizer's settings from the run that resumes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable

import torch

from txtrain import checkpoint
from txtrain.checkpoint import Checkpoints, agreed_load, find_checkpoint_everywhere, load_state, load_state_keys
from txtrain.collective import agree_or_refuse
from txtrain.config import Config, ConfigError, ModelConfig
from txtrain.optim import build_optimizer, length_changes_past_lrs, lr_factor, per_parameter_state

# Model settings that do not change the weights.
RUNTIME_ONLY = {"dropout", "impl", "activation_checkpointing"}

# Config keys (and whole subtrees) that may differ between a run and its continuation.
MAY_CHANGE = (
    "resume", "overwrite", "progress", "plot", "device", "compile", "logger", "launch", "plan", "parallel",
    "objective",  # what a sweeper reads from the run, not what it learns
    "precision.tf32", "model.impl", "model.activation_checkpointing",
    "train.steps", "train.micro_batch_size", "train.log_every", "train.eval_every",
    "train.save_every", "train.keep_last", "train.stop_signal", "train.eval_batch_size",
    "train.skip_nonfinite", "train.patience", "train.min_delta",
    # where the data is read from and how the run is evaluated and sampled, not what it learns
    "task.data", "task.cache_dir", "task.tokenizer_file", "task.eval_tokens", "task.prompts",
    "task.sample_tokens", "task.temperature", "task.top_k", "task.n_eval", "task.eval_min_len",
    "task.eval_max_len",
)

# What a run writes in its run dir besides checkpoints/ and the log file (cli.record_config
# writes .hydra/ again once the new run has passed its checks).
RUN_OUTPUTS = ("metrics.jsonl", "eval.jsonl", "samples.txt", "run.json", "memory.json", "loss.png",
               "tensorboard", "wandb", ".hydra")


@dataclass
class CheckpointMeta:
    """What a checkpoint holds besides the model and optimizer state (its ``meta.pt``): where
    the run was, each rank's random stream, and what a resume is checked against."""

    step: int
    tokens: int  # target tokens consumed so far, all ranks
    rng: list[dict]  # one state per rank
    last_loss: float
    last_eval: dict
    skipped_steps: int
    nonfinite_in_a_row: int
    schedule_steps: int  # the length the learning rates were planned for
    precision: dict  # the loss scaler's state (empty without one)
    model_config: dict  # plain(cfg.model)
    run_config: dict  # run_config(cfg)
    config_hash: str
    vocab_size: int
    codec: dict  # the task's tokenizer: sampling needs no data, only the checkpoint
    early_stopping: dict = dataclasses.field(default_factory=dict)  # EarlyStopping.state_dict(); {}: none
    # The window the run trained on and slid its samples at (the task's longest sequence), for
    # txtrain-sample to draw the same; 0 where not recorded: model.max_seq_len.
    context: int = 0

    @classmethod
    def load(cls, path: Path) -> CheckpointMeta:
        """The meta of the checkpoint at ``path``. Under several processes every rank calls it,
        and one that cannot read it stops them all (``LoadFailed``)."""
        # checkpoint.read_meta is looked up at each call: tests/fault_launcher.py replaces it
        return agreed_load(path, f"reading {checkpoint.META_FILE}", lambda: cls(**checkpoint.read_meta(path)))

    def as_dict(self) -> dict:
        """As ``meta.pt`` holds it: plain values, which ``torch.load`` reads with weights_only."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


# --- what must agree --------------------------------------------------------------------------
def plain(value):
    """A config (or part of one) as JSON-able values: dataclasses as dicts, enums as words."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def run_config(cfg: Config) -> dict:
    """The settings that make a run what it is, flattened to ``{"optim.lr": 0.001, ...}``."""
    flat = flatten(plain(cfg))
    return {key: value for key, value in flat.items()
            if not any(key == k or key.startswith(k + ".") for k in MAY_CHANGE)}


def config_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def differences(saved: dict, wanted: dict, skip: set = frozenset()) -> list[str]:
    return [f"{key} {saved.get(key)} -> {wanted.get(key)}" for key in sorted(saved.keys() | wanted.keys())
            if key not in skip and saved.get(key) != wanted.get(key)]


def check_same_model(meta: CheckpointMeta, model: ModelConfig, vocab_size: int, path: Path) -> None:
    saved = dict(meta.model_config, vocab_size=meta.vocab_size)
    differ = differences(saved, dict(plain(model), vocab_size=vocab_size), RUNTIME_ONLY)
    if differ:
        raise ConfigError(f"checkpoint {path} was written by a different model ({', '.join(differ)}); "
                          "use the same model settings, start over with resume=never overwrite=true, or "
                          "choose another hydra.run.dir")


def check_same_run(meta: CheckpointMeta, settings: dict, path: Path, explicit: bool) -> list[str]:
    """Refuse to continue a run dir's checkpoint under a different config; for a checkpoint
    named by path (``explicit``), return the differences as warnings instead."""
    differ = differences(meta.run_config, settings)
    if not differ:
        return []
    shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
    if explicit:
        return [f"checkpoint {path} was written under a different config ({shown}); "
                "continuing with this run's settings"]
    raise ConfigError(f"{path.parent.parent} holds a run with a different config ({shown}); continue "
                      "it with the same settings, start over there with resume=never overwrite=true, "
                      f"choose another hydra.run.dir, or carry its weights over with resume={path}")


def schedule_change(cfg: Config, meta: CheckpointMeta) -> list[str]:
    """A run extended (or shortened) under a schedule that depends on its length took its
    first steps on another schedule than a run of the new length would have: a line that says
    so (none otherwise)."""
    planned, steps, schedule, step = meta.schedule_steps, cfg.train.steps, cfg.schedule, meta.step
    if planned == steps or not length_changes_past_lrs(schedule, step, planned, steps):
        return []
    before = meta.run_config["optim.lr"] * lr_factor(schedule, step - 1, planned)
    after = cfg.optim.lr * lr_factor(schedule, step, steps)
    return [f"train.steps {planned} -> {steps} under schedule={plain(schedule.name)}, whose learning rate "
            f"depends on the run's length: it is recomputed for {steps} steps (lr {before:.6g} at step "
            f"{step}, {after:.6g} at step {step + 1}), so this run differs from one of "
            f"{steps} steps from the start"]


# --- finding and loading --------------------------------------------------------------------
def find_resume_point(cfg: Config, run_dir: Path, checkpoints: Checkpoints, strategy, vocab_size: int,
                      warn: Callable[[str], None]) -> tuple[Path, CheckpointMeta] | None:
    """The checkpoint this run continues (``cfg.resume``) and its meta, checked against this
    run; None to start afresh (under resume=never, in a run dir cleared of an old run)."""
    if cfg.resume == "never":
        start_over(cfg, run_dir, checkpoints, strategy)
    path = find_checkpoint_everywhere(cfg.resume, run_dir, warn, strategy.gather)
    if path is None:
        return None
    meta = CheckpointMeta.load(path)
    check_same_model(meta, cfg.model, vocab_size, path)
    for line in check_same_run(meta, run_config(cfg), path, explicit=cfg.resume != "auto"):
        warn(line)
    return path, meta


def load_model_and_optimizer(path: Path, meta: CheckpointMeta, cfg: Config, strategy, model: torch.nn.Module,
                             optimizer: torch.optim.Optimizer,
                             warn: Callable[[str], None]) -> torch.optim.Optimizer:
    """The checkpoint's weights and optimizer state into this run's model and optimizer, whose
    settings stay this run's. A checkpoint of another optimizer gives its weights only, and the
    optimizer starts afresh. Returns the optimizer to go on with."""
    state = strategy.state_dict(model, optimizer)
    reason = optimizer_state_unusable(path, meta, cfg, state["optimizer"], strategy.gather)
    if reason is None:
        # Of the optimizer, each parameter's state only: the hyperparameters of the param
        # groups (betas, eps, weight decay, momentum, ...) stay the ones this run configured.
        wanted = {"model": state["model"], "optimizer": per_parameter_state(state["optimizer"])}
        load_state(path, wanted)
        state["optimizer"].update(wanted["optimizer"])  # values that are not tensors come back new
        strategy.load_state_dict(model, optimizer, {**state, "model": wanted["model"]})
        return optimizer
    wanted = {"model": state["model"]}
    load_state(path, wanted)
    strategy.load_state_dict(model, optimizer, {**state, "model": wanted["model"]})
    warn(f"{reason}: loading the weights only (the optimizer starts afresh)")
    # A new optimizer: the old one holds the placeholder state that get_state_dict made up.
    return build_optimizer(model, cfg.optim, strategy.device)


def optimizer_state_unusable(path: Path, meta: CheckpointMeta, cfg: Config, optimizer_state: dict,
                             gather: Callable[[object], list]) -> str | None:
    """Why the checkpoint's optimizer state cannot continue in this run's optimizer (None:
    it can). Every rank decides the same, or they would leave with different optimizers."""
    mine, saved = plain(cfg.optim.name), meta.run_config["optim.name"]
    if saved != mine:
        return f"checkpoint {path} holds the state of optim={saved}, this run uses optim={mine}"
    # Also the same optimizer may need state the checkpoint lacks (sgd saved with momentum 0).
    have = load_state_keys(path)
    needed = flat_keys(per_parameter_state(optimizer_state), "optimizer.")
    missing = {key.rsplit(".", 1)[-1] for key in needed if key not in have}  # e.g. momentum_buffer
    missing = sorted(set().union(*gather(missing)))
    if missing:
        return f"checkpoint {path} holds no {'/'.join(missing)} for this run's optim={mine}"
    return None


def flat_keys(tree: dict, prefix: str = "") -> list[str]:
    """A nested dict's keys as torch.distributed.checkpoint names them: joined with dots."""
    keys = []
    for key, value in tree.items():
        keys += flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"]
    return keys


# --- starting over, and a run that has already finished ---------------------------------------
def start_over(cfg: Config, run_dir: Path, checkpoints: Checkpoints, strategy) -> None:
    """resume=never in a run dir that holds another run's checkpoints: refuse, unless
    overwrite=true, which deletes them and everything else the old run wrote."""
    earlier = checkpoints.saved()
    if not earlier and not cfg.overwrite:
        return
    if not cfg.overwrite:
        raise ConfigError(f"{run_dir} already holds a run's checkpoints ({earlier[-1].name} "
                          "and maybe more); continue it with resume=auto, start over there with "
                          "resume=never overwrite=true (deletes them), or choose another hydra.run.dir")
    strategy.barrier()  # every rank has looked before anything goes

    def remove() -> None:
        if strategy.is_main:
            shutil.rmtree(checkpoints.directory, ignore_errors=True)
            remove_run_outputs(run_dir)

    # rank 0 deletes; should it fail, every rank stops, rather than wait for it
    agree_or_refuse("deleting the earlier run's outputs (overwrite=true) failed", remove)


def remove_run_outputs(run_dir: Path) -> None:
    """Delete an old run's outputs. Its log file is emptied, not deleted: the handler that
    writes this run's messages may have it open already (appending), and would go on writing
    to the deleted file."""
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for log_file in log_files(run_dir):
        if log_file.is_file():
            os.truncate(log_file, 0)


def log_files(run_dir: Path) -> set[Path]:
    """The run's log file (Hydra's ``<job name>.log``) and any other that logging writes in the run dir."""
    handlers = [*logging.root.handlers, *(handler for logger in logging.Logger.manager.loggerDict.values()
                                          if isinstance(logger, logging.Logger) for handler in logger.handlers)]
    here = Path(os.path.abspath(run_dir))
    return {run_dir / "txtrain.log"} | {Path(handler.baseFilename) for handler in handlers
                                       if isinstance(handler, logging.FileHandler)
                                       and Path(handler.baseFilename).parent == here}


def finished_result(run_dir: Path, strategy, step: int, steps: int, stopped_early: bool = False) -> dict | None:
    """The recorded result of a run that has already reached ``steps`` or stopped early (the
    same command run again): nothing is trained, and its run.json stays as it is. None
    otherwise."""
    if step < steps and not stopped_early:
        return None
    result = None
    if strategy.is_main:
        try:
            result = json.loads((run_dir / "run.json").read_text()).get("result")
        except (OSError, ValueError):
            pass  # no record of its end (it stopped after its last save): evaluate again
    result = strategy.gather(result)[0]  # every rank takes the same path
    if result is not None and strategy.is_main:
        why = (f"the run ran out of train.patience at step {step}; raise train.patience" if step < steps
               else f"the run is at step {step} and train.steps={steps}; raise train.steps")
        logging.getLogger("txtrain").info(f"nothing to train: {why} to continue it")
    return result
