"""Checkpoints: one folder per save, published whole, and a pointer to the latest.

``checkpoints/step_000500/state.pt`` holds the model, optimizer, step and RNG states. A save
is written to a hidden temporary folder and renamed into place, and ``checkpoints/latest`` is
replaced atomically after it, so the pointer only ever names a complete checkpoint.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import torch

from txtrain.config import ConfigError

POINTER = "latest"
STATE_FILE = "state.pt"


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
    def __init__(self, directory: Path):
        self.directory = directory

    def save(self, step: int, state: dict) -> Path:
        final = self.directory / step_dir_name(step)
        if final.exists():  # this step is already saved, whole
            return final
        tmp = self.directory / f".{final.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(state, tmp / STATE_FILE)
        os.replace(tmp, final)
        pointer_tmp = self.directory / f".{POINTER}.tmp"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, self.directory / POINTER)
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
        if (candidate / STATE_FILE).is_file():
            return candidate
        latest = Checkpoints(candidate).latest()
        if latest is not None:
            return latest
    if not path.exists():
        raise ConfigError(f"resume={resume}: no such file or folder; give a checkpoint folder, "
                          "a run dir, resume=auto or resume=never")
    raise ConfigError(f"resume={resume}: no checkpoint found there (expected {STATE_FILE} or a "
                      f"'{POINTER}' pointer)")


def load_state(path: Path) -> dict:
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
