"""Checkpoints: one folder per save, published whole, and a pointer to the latest.

``checkpoints/step_000500/`` holds ``state/``, the model and optimizer state written by
``torch.distributed.checkpoint`` (each rank writes the shards it owns; any layout can load
them back into any other: fsdp over 2 processes into one, a pipeline into ddp, ...), and
``meta.pt`` with the step, counters, RNG states and model config. A save is written to a hidden
temporary folder and renamed into place, and ``checkpoints/latest`` is replaced atomically
after it, so the pointer only ever names a complete checkpoint.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
import random
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from txtrain.config import ConfigError

POINTER = "latest"
STATE_DIR = "state"
META_FILE = "meta.pt"


@contextmanager
def single_process_is_fine():
    """torch.distributed.checkpoint warns whenever it runs without a process group; for us that
    is simply a run with one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def capture_rng() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """Saving is collective: every rank calls ``save`` with its own ``state`` (tensors, whole or
    sharded); rank 0 (``is_main``) writes ``meta`` and publishes the folder."""

    def __init__(self, directory: Path, is_main: bool = True, barrier: Callable[[], None] = lambda: None):
        self.directory = directory
        self.is_main = is_main
        self.barrier = barrier

    def save(self, step: int, state: dict, meta: dict) -> Path:
        final = self.directory / step_dir_name(step)
        if final.exists():  # this step is already saved, whole
            return final
        tmp = self.directory / f".{final.name}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.barrier()
        with single_process_is_fine():
            from torch.distributed import checkpoint as dcp  # slow to import: only when used

            dcp.save(state, checkpoint_id=tmp / STATE_DIR, no_dist=not dist.is_initialized())
        if self.is_main:
            torch.save(meta, tmp / META_FILE)
        self.barrier()
        if self.is_main:
            os.replace(tmp, final)
            pointer_tmp = self.directory / f".{POINTER}.tmp"
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, self.directory / POINTER)
        self.barrier()
        return final

    def latest(self) -> Path | None:
        pointer = self.directory / POINTER
        if not pointer.is_file():
            return None
        return self.directory / pointer.read_text().strip()


def find_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: ``auto`` = the run dir's latest (or none),
    ``never`` = none, else a path to a checkpoint folder, a checkpoints folder or a run dir."""
    if resume == "never":
        return None
    if resume == "auto":
        return Checkpoints(run_dir / "checkpoints").latest()
    path = Path(resume).expanduser()
    for candidate in (path, path / "checkpoints"):
        if (candidate / META_FILE).is_file():
            return candidate
        latest = Checkpoints(candidate).latest()
        if latest is not None:
            return latest
    if not path.exists():
        raise ConfigError(f"resume={resume}: no such file or folder; give a checkpoint folder, "
                          "a run dir, resume=auto or resume=never")
    raise ConfigError(f"resume={resume}: no checkpoint found there (expected {META_FILE} or a "
                      f"'{POINTER}' pointer)")


def load_meta(path: Path) -> dict:
    return torch.load(path / META_FILE, map_location="cpu", weights_only=True)


def load_state(path: Path, state: dict) -> None:
    """Fill ``state`` (tensors shaped and placed as this rank holds them) from the checkpoint
    at ``path``, whatever layout wrote it. Keys absent from ``state`` are not read."""
    with single_process_is_fine():
        from torch.distributed import checkpoint as dcp

        dcp.load(state, checkpoint_id=path / STATE_DIR, no_dist=not dist.is_initialized())


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into a plain (unwrapped, unsharded) model."""
    state = {"model": model.state_dict()}
    load_state(path, state)
    model.load_state_dict(state["model"])
