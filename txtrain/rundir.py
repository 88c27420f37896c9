"""Who writes where.

* A run dir belongs to one run at a time: the run holds ``<run dir>/.lock`` with ``flock``,
  which the kernel lets go of when the holder dies, however it dies, so the lock file a killed
  run leaves behind never blocks the next run. The file names the holder for the message a
  second run gets.
* A run dir or sweep dir named after the start time (``outputs/<date>/<time>``, the default) is
  claimed by creating it: a run or sweep started in the same second as another gets the next
  free name (``<time>_1``, ...). A name the user gave on purpose (``hydra.run.dir=runs/rev``,
  which is how a run is resumed) is used as it is, and the lock decides.
* A command that is refused, or stopped before training started, removes the folders it made
  for its run dir (while they are empty) and nothing else.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import socket
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from txtrain import distributed
from txtrain.config import ConfigError

LOCK_FILE = ".lock"
DATED = ("${started:", "${now:")  # a folder named after the start time: claimed, not shared

# The folders this command made for its run dir, outermost first (on rank 0 only).
made_here: list[Path] = []
held: "RunDirLock | None" = None  # this run's lock, while it runs


class RunDirs(Callback):
    """Hydra calls it before it makes the run dir (or a sweep's folder); see train.yaml."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        made_here.clear()
        try:
            dated = is_dated(config.hydra.run)
            requested = Path(str(config.hydra.run.dir))  # every rank: the start time is shared
            path, made = distributed.decided_by_rank_0(
                lambda: claim_across_restarts(requested) if dated else (requested, make_folders(requested)))
        except (OSError, OmegaConfBaseException):
            return  # Hydra's own attempt to make it fails too, and says why in one line
        if distributed.env_rank() == 0:  # the one that made them
            made_here.extend(made)
        if dated:
            config.hydra.run.dir = escaped(str(path))

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        made_here.clear()
        try:
            if not is_dated(config.hydra.sweep):
                return
            requested = Path(str(config.hydra.sweep.dir))
            path, _ = distributed.decided_by_rank_0(lambda: claim(requested))
        except (OSError, OmegaConfBaseException):
            return
        config.hydra.sweep.dir = escaped(str(path))
        # Every job's config is composed again from the command line's overrides, in this
        # process or (submitit) in another: this one makes them all name the claimed folder.
        config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quoted(str(path))}")


def is_dated(node: DictConfig) -> bool:
    """Whether the node's ``dir`` is named after the start time (rather than by the user)."""
    pattern = OmegaConf.to_container(node, resolve=False).get("dir")
    return isinstance(pattern, str) and any(marker in pattern for marker in DATED)


def claim_across_restarts(requested: Path) -> tuple[Path, list[Path]]:
    """Claim ``requested`` (or the next free name); a group that torchrun restarts gets the run
    dir its first attempt claimed, and resumes there."""
    made: list[Path] = []

    def claimed() -> str:
        path, new = claim(requested)
        made.extend(new)
        return str(path)

    return Path(distributed.kept_across_restarts(f"run_dir:{requested}", claimed)), made


def claim(requested: Path) -> tuple[Path, list[Path]]:
    """Make ``requested``, or if it exists ``<name>_1``, ``<name>_2``, ...: making a folder is
    atomic, so two runs never claim the same one. Returns it and every folder made."""
    made = make_folders(requested.parent)
    for n in itertools.count():
        candidate = requested if n == 0 else requested.with_name(f"{requested.name}_{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate, [*made, candidate]


def make_folders(path: Path) -> list[Path]:
    """Make ``path`` and its missing parents; returns those this call made, outermost first."""
    missing = [folder for folder in [path, *path.parents] if not folder.is_dir()][::-1]
    made = []
    try:
        for folder in missing:
            try:
                folder.mkdir()
            except FileExistsError:  # made meanwhile by someone else: theirs
                continue
            made.append(folder)
    except OSError:
        remove_empty(made)
        raise
    return made


def remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (outermost first) while they are empty, innermost first."""
    for folder in reversed(folders):
        try:
            folder.rmdir()  # only ever removes an empty folder
        except OSError:
            break  # not empty (or gone): neither are its parents


def escaped(text: str) -> str:
    """``text`` as a config value that stays literal (no interpolation)."""
    return text.replace("${", "\\${")


def quoted(text: str) -> str:
    """``text`` as a quoted override value (Hydra's grammar: backslashes are escaped only
    before a quote or at the end)."""
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text).replace("'", "\\'")
    return f"'{escaped(text)}'"


# --- the lock ---------------------------------------------------------------------------------
class RunDirLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> None:
        """Hold the lock, or raise ConfigError naming its holder. Opening an existing lock file
        changes nothing in the run dir."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "one starting"
                os.close(fd)
                raise ConfigError(f"{self.path.parent} is in use by another run ({holder}); wait "
                                  "for it to end, or choose another hydra.run.dir") from None
            except OSError as error:
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                os.close(fd)  # a file system without locks: run unguarded, as before locks
                return
            if is_same_file(fd, self.path):
                break
            os.close(fd)  # its last holder removed the file as it let go: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        """Remove the lock file, then let go (whoever opened the old file meanwhile sees it
        gone and locks a new one)."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


def is_same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (on_disk.st_dev, on_disk.st_ino) == (opened.st_dev, opened.st_ino)


def take(run_dir: Path) -> None:
    """Lock the run dir for this run, or raise ConfigError. Under several processes rank 0
    holds it for all of them, and every rank learns whether it got it."""

    def lock_it() -> None:
        global held
        lock = RunDirLock(run_dir)
        lock.acquire()
        held = lock

    distributed.decided_by_rank_0(lock_it)


def let_go() -> None:
    global held
    if held is not None:
        held.release()
        held = None


def leave_no_trace() -> None:
    """A command that is refused or stopped before training: let go of the run dir, and
    remove the folders made for it while they are empty, innermost first."""
    let_go()
    remove_empty(made_here)
    made_here.clear()
