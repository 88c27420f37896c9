"""Checkpoints: one folder per save, published whole, and a pointer to the latest.

``checkpoints/step_000500/`` holds ``state/``, the model and optimizer state written by
``torch.distributed.checkpoint`` (each rank writes the shards it owns; any layout can load
them back into any other: fsdp over 2 processes into one, a pipeline into ddp, ...), and
``meta.pt`` with the step, counters, RNG states and model config. A save is written to a hidden
temporary folder and renamed into place, and ``checkpoints/latest`` is replaced atomically
after it, so the pointer only ever names a complete checkpoint.

``manifest.json``, written last inside the folder, lists every file with its size and sha256,
and the hash of the run's config (``compat.run_config``).
Loading verifies it: a truncated or altered checkpoint is named as damaged, and ``resume=auto``
falls back to the newest one that is whole. ``train.keep_last=K`` deletes all but the newest K
after each save (the one just written, which is whole, always stays). A save that fails (a
full disk) leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from contextlib import contextmanager
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from txtrain.config import ConfigError

POINTER = "latest"
STATE_DIR = "state"
META_FILE = "meta.pt"
MANIFEST = "manifest.json"


class DamagedCheckpoint(ConfigError):
    """A checkpoint whose files do not match its manifest (or that has none)."""


class SaveFailed(Exception):
    """A save that did not complete; nothing it wrote was published."""


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

    def __init__(self, directory: Path, is_main: bool = True, barrier: Callable[[], None] = lambda: None,
                 keep_last: int = 0):
        self.directory = directory
        self.is_main = is_main
        self.barrier = barrier
        self.keep_last = keep_last  # 0: keep every checkpoint
        self.last_written: Path | None = None  # by this process: known whole, no need to verify

    def save(self, step: int, state: dict, meta: dict) -> Path:
        final = self.directory / step_dir_name(step)
        if final == self.last_written:  # saved a moment ago (a stop request at a save step)
            return final
        if final.exists():
            try:
                verify(final)
                return final  # this step is already saved, whole
            except DamagedCheckpoint:
                self.barrier()  # every rank has looked before it goes
                if self.is_main:
                    shutil.rmtree(final)
        tmp = self.directory / f".{final.name}.tmp"
        try:
            self.write(tmp, step, state, meta)
        except (OSError, RuntimeError) as error:  # a full disk; torch reports some as RuntimeError
            if self.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise SaveFailed(f"saving the checkpoint of step {step} failed ({error}); the previous "
                             f"checkpoint ({self.latest() or 'none yet'}) is intact") from error
        if self.is_main:
            os.replace(tmp, final)
            pointer_tmp = self.directory / f".{POINTER}.tmp"
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, self.directory / POINTER)
            self.prune()
        self.barrier()
        self.last_written = final
        return final

    def write(self, tmp: Path, step: int, state: dict, meta: dict) -> None:
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
            write_manifest(tmp, step, meta.get("config_hash"))

    def prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints (the newest was just written whole)."""
        if self.keep_last > 0:
            for old in self.saved()[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)

    def saved(self) -> list[Path]:
        """The published checkpoint folders, oldest first."""
        return sorted(p for p in self.directory.glob("step_*") if p.is_dir())

    def newest_whole(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that verifies, trying the pointer's first; and a line for
        each damaged one passed over."""
        latest = self.latest()
        candidates = ([latest] if latest is not None else []) + \
            [p for p in reversed(self.saved()) if p != latest]
        skipped = []
        for path in candidates:
            try:
                verify(path)
                return path, skipped
            except DamagedCheckpoint as damage:
                skipped.append(str(damage))
        return None, skipped

    def latest(self) -> Path | None:
        pointer = self.directory / POINTER
        if not pointer.is_file():
            return None
        return self.directory / pointer.read_text().strip()


def write_manifest(folder: Path, step: int, config_hash: str | None = None) -> None:
    files = {str(f.relative_to(folder)): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
             for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST}
    partial = folder / f".{MANIFEST}.tmp"
    partial.write_text(json.dumps({"step": step, "config_hash": config_hash, "files": files}, indent=1) + "\n")
    os.replace(partial, folder / MANIFEST)


def verify(folder: Path) -> None:
    """Raise DamagedCheckpoint unless every file the manifest lists is there, whole."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise DamagedCheckpoint(f"checkpoint {folder} has no readable {MANIFEST} "
                                f"({error.__class__.__name__}): it is incomplete or damaged") from None
    for name, expected in manifest["files"].items():
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != expected["bytes"]:
            found = "missing" if size is None else f"{size:,} bytes"
            raise DamagedCheckpoint(f"checkpoint {folder} is damaged: {name} is {found}, its manifest "
                                    f"says {expected['bytes']:,} bytes")
        if file_sha256(path) != expected["sha256"]:
            raise DamagedCheckpoint(f"checkpoint {folder} is damaged: {name} does not match the "
                                    "checksum in its manifest")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def find_checkpoint(resume: str, run_dir: Path, log: Callable[[str], None] = lambda line: None) -> Path | None:
    """The checkpoint folder to resume from: ``auto`` = the run dir's newest whole one (or
    none), ``never`` = none, else a path to a checkpoint folder, a checkpoints folder or a run
    dir. Damaged checkpoints passed over by ``auto`` are reported through ``log``."""
    if resume == "never":
        return None
    if resume == "auto":
        checkpoints = Checkpoints(run_dir / "checkpoints")
        path, skipped = checkpoints.newest_whole()
        for line in skipped:
            log(f"{line}; passed over")
        if path is None and skipped:
            raise DamagedCheckpoint(f"every checkpoint in {checkpoints.directory} is damaged; start "
                                    "afresh with resume=never overwrite=true (or another hydra.run.dir)")
        return path
    path = Path(resume).expanduser()
    for candidate in (path, path / "checkpoints"):
        if (candidate / META_FILE).is_file():
            verify(candidate)
            return candidate
        latest = Checkpoints(candidate).latest()
        if latest is not None:
            verify(latest)
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
