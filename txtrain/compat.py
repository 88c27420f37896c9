"""What a checkpoint must share with the run that resumes it.

Two checks, both before anything is loaded or written:

- the **model** must be the same (its weights would not fit otherwise), whichever way the
  checkpoint was found;
- the rest of the **run's config** must be the same too when resuming a run dir's own
  checkpoints (``resume=auto``): the task, optimizer, schedule, batch, seed and precision make
  the run what it is, and a rerun with another learning rate in the same dir is a mistake, not
  a continuation. Settings that only say how long, how often, where or with how many processes
  (``train.steps``, ``parallel``, ``device``, ...) may change. A checkpoint named by path
  (``resume=<path>``) carries its weights into a different config on purpose: the differences
  are reported, not refused.

The config that counts is also hashed into the checkpoint's manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from enum import Enum
from pathlib import Path

from txtrain.config import Config, ConfigError, ModelConfig

# Model settings that do not change the weights.
RUNTIME_ONLY = {"dropout", "impl", "activation_checkpointing"}

# Config keys (and whole subtrees) that may differ between a run and its continuation.
MAY_CHANGE = (
    "resume", "overwrite", "progress", "device", "compile", "logger", "launch", "plan", "parallel",
    "debug.nonfinite_steps", "precision.tf32", "model.impl", "model.activation_checkpointing",
    "train.steps", "train.micro_batch_size", "train.log_every", "train.eval_every",
    "train.save_every", "train.keep_last", "train.stop_signal", "train.eval_batch_size",
    "train.skip_nonfinite",
    # where the data is read from and how the run is evaluated and sampled, not what it learns
    "task.data", "task.cache_dir", "task.tokenizer_file", "task.eval_tokens", "task.prompts",
    "task.sample_tokens", "task.temperature", "task.top_k", "task.n_eval", "task.eval_min_len",
    "task.eval_max_len",
)


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


def check_same_model(meta: dict, model_config: dict, vocab_size: int, path: Path) -> None:
    # A key that an older checkpoint lacks (added since, like arch) had its default value.
    saved = dict(plain(ModelConfig()), **meta["model_config"], vocab_size=meta["vocab_size"])
    differ = differences(saved, dict(model_config, vocab_size=vocab_size), RUNTIME_ONLY)
    if differ:
        raise ConfigError(f"checkpoint {path} was written by a different model ({', '.join(differ)}); "
                          "use the same model settings, start over with resume=never overwrite=true, or "
                          "choose another hydra.run.dir")


def check_same_run(meta: dict, settings: dict, path: Path, explicit: bool) -> list[str]:
    """Refuse to continue a run dir's checkpoint under a different config; for a checkpoint
    named by path (``explicit``), return the differences as warnings instead."""
    if "run_config" not in meta:  # written before checkpoints recorded their config
        return []
    saved = meta["run_config"]
    # Keys txtrain added after the checkpoint was written cannot have differed then.
    differ = differences(saved, {key: value for key, value in settings.items() if key in saved})
    if not differ:
        return []
    shown = ", ".join(differ[:4]) + (f" and {len(differ) - 4} more" if len(differ) > 4 else "")
    if explicit:
        return [f"checkpoint {path} was written under a different config ({shown}); "
                "continuing with this run's settings"]
    raise ConfigError(f"{path.parent.parent} holds a run with a different config ({shown}); continue "
                      "it with the same settings, start over there with resume=never overwrite=true, "
                      f"choose another hydra.run.dir, or carry its weights over with resume={path}")
