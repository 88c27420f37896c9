"""Checkpoints: one folder per save, published whole.

``checkpoints/step_000500/`` holds ``state/``, the model and optimizer state written by
``torch.distributed.checkpoint`` (each rank writes the shards it owns; any layout can load
them back into any other: fsdp over 2 processes into one, a pipeline into ddp, ...), and
``meta.pt`` with the step, counters, RNG states and model config (``resume.CheckpointMeta``).
A save is written to a hidden temporary folder and renamed into place. ``checkpoints/latest``
names the newest for people and other tools; txtrain itself goes by the step numbers in the
names (a crash between a rename and the pointer's update would leave the pointer behind).
Under ``train.patience``, ``checkpoints/best`` names the checkpoint of the best evaluation
(``txtrain-sample --best``).

``manifest.json``, written last inside the folder, lists every file with its size and sha256,
and the hash of the run's config (``resume.run_config``).
Loading verifies it: a truncated or altered checkpoint is named as damaged, and ``resume=auto``
falls back to the newest one that is whole. ``train.keep_last=K`` deletes all but the newest K
after each save (the one just written, which is whole, always stays, and so does the one
``best`` names).

Under several processes every phase of a save or a load ends the same way on every rank
(``collective.agree``): a save that fails anywhere (a full disk) is reported by all ranks,
which train on from the previous checkpoints, left as they were; a load that fails anywhere
stops all ranks with the same one-line error. None is left waiting for another.

Loading runs no code from the checkpoint: ``meta.pt`` is read with ``weights_only``, and the
state's ``.metadata``, which torch.distributed.checkpoint writes and reads as a plain pickle,
is read through ``MetadataUnpickler``, which admits only the classes such metadata is made of.
A checkpoint whose metadata names anything else is refused (``UnsafeCheckpoint``) before
anything of it is unpickled by torch.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
import socket
from contextlib import contextmanager
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from txtrain.collective import Gather, PhaseFailed, agree, describe_failure, gather_all, node_leader
from txtrain.config import ConfigError, TrainingStopped
from txtrain.digest import file_sha256

POINTER = "latest"
BEST_POINTER = "best"  # train.patience: the checkpoint of the best evaluation
STATE_DIR = "state"
META_FILE = "meta.pt"
MANIFEST = "manifest.json"
STEP_NAME = re.compile(r"step_(\d+)")
REPLACED = ".old"  # `.step_000500.old`: a checkpoint moved aside while its step is published anew


class DamagedCheckpoint(ConfigError):
    """A checkpoint whose files do not match its manifest (or that has none)."""


class UnsafeCheckpoint(DamagedCheckpoint):
    """A checkpoint whose state metadata would run code (or build objects no metadata holds)
    when unpickled."""


class SaveFailed(Exception):
    """A save that did not complete; nothing it wrote was published."""


class LoadFailed(TrainingStopped):
    """A checkpoint that some rank could not read (every rank stops, with this one line)."""


@contextmanager
def single_process_is_fine():
    """torch.distributed.checkpoint warns whenever it runs without a process group; for us that
    is simply a run with one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(folder: Path) -> int | None:
    """The step a checkpoint folder holds, from its name (``step_000500``, or the
    ``.step_000500.old`` a replacement moved aside); None for any other name. Names are never
    compared as strings: ``step_1000000`` comes after ``step_999500``."""
    name = folder.name
    if name.startswith(".") and name.endswith(REPLACED):
        name = name[1:-len(REPLACED)]
    match = STEP_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


class Checkpoints:
    """Saving is collective: every rank calls ``save`` with its own ``state`` (tensors, whole or
    sharded); rank 0 (``is_main``) writes ``meta``, publishes the folder and tidies up.
    ``gather`` is the strategy's (every rank's object, on every rank)."""

    def __init__(self, directory: Path, is_main: bool = True, gather: Gather = gather_all,
                 keep_last: int = 0):
        self.directory = directory
        self.is_main = is_main
        self.gather = gather
        self.keep_last = keep_last  # 0: keep every checkpoint
        self.last_written: Path | None = None  # by this process, at its step: no need to write it again

    def save(self, step: int, state: dict, meta: dict, warn: Callable[[str], None] = lambda line: None,
             config_hash: str | None = None, best_step: int | None = None) -> Path:
        """Write the checkpoint of ``step`` (replacing one of the same step from an earlier run,
        safely): ``state``, ``meta`` as its meta.pt, and ``config_hash`` in its manifest;
        ``best_step``: the step of the best evaluation so far, for the ``best`` pointer. A
        failure on any rank is a ``SaveFailed`` on every rank, with the same message, and leaves
        the earlier checkpoints as they were. After it is published, whatever goes wrong tidying
        up (the pointer, deleting old checkpoints) only ``warn``s."""
        final = self.directory / step_dir_name(step)
        if final == self.last_written:  # saved a moment ago (a stop request at a save step)
            return final
        tmp = self.directory / f".{final.name}.tmp"
        phases = [("preparing its folder", self.on_main(self.prepare, tmp)),
                  ("writing the model and optimizer state", lambda: write_state(tmp, state)),
                  (f"writing {META_FILE}", self.on_main(write_meta, tmp, meta)),
                  (f"writing {MANIFEST}", self.on_main(write_manifest, tmp, step, config_hash)),
                  ("publishing it", self.on_main(self.publish, tmp, final))]
        try:
            for phase, action in phases:
                agree(phase, action, self.gather, self.describe_write_failure)
        except PhaseFailed as failure:
            if self.is_main:  # every rank is done with it
                shutil.rmtree(tmp, ignore_errors=True)
            raise SaveFailed(f"saving the checkpoint of step {step} failed ({failure}); the previous "
                             f"checkpoint ({self.latest() or 'none yet'}) is intact") from failure
        self.last_written = final
        if self.is_main:
            self.tidy(final, warn, best_step)
        return final

    def on_main(self, function: Callable, *args) -> Callable[[], None]:
        """``function(*args)`` on rank 0, nothing elsewhere (every rank still takes part in
        agreeing on how it went)."""
        return lambda: function(*args) if self.is_main else None

    def prepare(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed save's leftovers
        tmp.mkdir(parents=True)

    def publish(self, tmp: Path, final: Path) -> None:
        """Rename the finished folder into place. A folder of the same step (an earlier run's,
        which this run replaced from an earlier step) is moved aside first and deleted only
        after: a crash in between leaves it whole, and found (``saved``)."""
        aside = final.with_name(f".{final.name}{REPLACED}")
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except BaseException:
            if aside.exists() and not final.exists():
                os.replace(aside, final)  # as it was
            raise

    def tidy(self, final: Path, warn: Callable[[str], None], best_step: int | None = None) -> None:
        """On rank 0, after ``final`` is published: point ``latest`` at it, delete the
        checkpoints it makes obsolete and point ``best`` at the best one (before pruning,
        which spares it). The new checkpoint is whole whatever happens here, so a failure is
        a warning."""
        for what, action in (("updating the 'latest' pointer", lambda: self.point_to(final)),
                             ("deleting a replaced run's checkpoints", lambda: self.remove_replaced(final, warn)),
                             ("updating the 'best' pointer", lambda: self.point_best(best_step)),
                             ("deleting old checkpoints (train.keep_last)", lambda: self.prune(warn))):
            try:
                action()
            except Exception as error:
                warn(f"{what} after saving {final.name} failed ({describe_failure(error)})")

    def point_to(self, final: Path, pointer: str = POINTER) -> None:
        """Write ``pointer`` (a file naming ``final``) whole or not at all."""
        pointer_tmp = self.directory / f".{pointer}.tmp"
        try:
            pointer_tmp.write_text(final.name + "\n")
            os.replace(pointer_tmp, self.directory / pointer)
        finally:
            pointer_tmp.unlink(missing_ok=True)

    def point_best(self, best_step: int | None) -> None:
        """Name the checkpoint of ``best_step`` in ``best``. Where it is not on disk (its save
        failed) the pointer keeps naming the best one that is, unless that is gone too
        (deleted with a run this one replaced): then there is no pointer."""
        folder = None if best_step is None else self.directory / step_dir_name(best_step)
        if folder is not None and folder.is_dir():
            self.point_to(folder, BEST_POINTER)
        elif self.best() is None:
            (self.directory / BEST_POINTER).unlink(missing_ok=True)

    def remove_replaced(self, final: Path, warn: Callable[[str], None]) -> None:
        """This run came to ``final``'s step from an earlier one: checkpoints past it (and the
        copy of this step moved aside) belong to the run it replaced there, whose later records
        the run's logs have already dropped. Left in place, they would be taken for newer."""
        step = step_of(final)
        later = [path for path in self.saved() if step_of(path) > step]
        self.remove([final.with_name(f".{final.name}{REPLACED}"), *later], warn)
        if later:
            warn(f"deleted {', '.join(path.name for path in later)}: an earlier run's checkpoints past "
                 f"{final.name}, which this run has replaced")

    def prune(self, warn: Callable[[str], None]) -> None:
        """Keep the newest ``keep_last`` checkpoints (the newest was just written whole), and
        the one ``best`` names."""
        if self.keep_last > 0:
            best = self.best()
            self.remove([path for path in self.saved()[: -self.keep_last] if path != best], warn)

    def remove(self, folders: list[Path], warn: Callable[[str], None]) -> None:
        for folder in folders:
            try:
                shutil.rmtree(folder)
            except FileNotFoundError:
                pass
            except OSError as error:
                warn(f"could not delete {folder} ({describe_failure(error)})")

    def describe_write_failure(self, error: BaseException) -> str:
        """A failed write, with the room left where it was writing (a full disk is the usual
        cause, and torch may report it as an unexpected position in a zip file)."""
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return describe_failure(error)
        return f"{describe_failure(error)}; {free / 2**20:.1f} MiB free in {self.directory}"

    def saved(self) -> list[Path]:
        """The published checkpoint folders, oldest first by step. A step whose folder is
        missing but whose copy moved aside is there (a crash in the middle of replacing it)
        is represented by that copy."""
        if not self.directory.is_dir():
            return []
        published, aside = {}, {}
        for path in self.directory.iterdir():
            step = step_of(path)
            if step is not None and path.is_dir():
                (aside if path.name.startswith(".") else published)[step] = path
        return [path for _, path in sorted({**aside, **published}.items())]

    def latest(self) -> Path | None:
        """The newest checkpoint, by step (not verified: see ``newest_whole``)."""
        saved = self.saved()
        return saved[-1] if saved else None

    def best(self) -> Path | None:
        """The checkpoint that ``best`` names (train.patience), if there is one."""
        try:
            name = (self.directory / BEST_POINTER).read_text().strip()
        except FileNotFoundError:
            return None
        folder = self.directory / name
        return folder if step_of(folder) is not None and folder.is_dir() else None

    def newest_whole(self) -> tuple[Path | None, list[str]]:
        """The newest checkpoint that verifies, and a line for each damaged one passed over."""
        skipped = []
        for path in reversed(self.saved()):
            try:
                verify(path)
                return path, skipped
            except DamagedCheckpoint as damage:
                skipped.append(str(damage))
        return None, skipped


def write_state(folder: Path, state: dict) -> None:
    """This rank's tensors into ``folder/state`` (collective: every rank writes its shards)."""
    with single_process_is_fine():
        from torch.distributed import checkpoint as dcp  # slow to import: only when used

        dcp.save(state, checkpoint_id=folder / STATE_DIR, no_dist=not dist.is_initialized())


def write_meta(folder: Path, meta: dict) -> None:
    torch.save(meta, folder / META_FILE)


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
    check_metadata(folder)


def find_checkpoint(resume: str, run_dir: Path, log: Callable[[str], None] = lambda line: None,
                    named: str | None = None) -> Path | None:
    """The checkpoint folder to resume from: ``auto`` = the run dir's newest whole one (or
    none), ``never`` = none, else a path to a checkpoint folder, a checkpoints folder or a run
    dir (its newest checkpoint, which must be whole). Damaged checkpoints passed over by
    ``auto`` are reported through ``log``. Errors name the path as ``named`` (what the caller
    was given: by default ``resume=<path>``)."""
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
        newest = Checkpoints(candidate).latest()
        if newest is not None:
            verify(newest)
            return newest
    where = named or f"resume={resume}"
    if not path.exists():
        raise ConfigError(f"{where}: no such file or folder; give a checkpoint folder or a run dir"
                          + ("" if named else ", resume=auto or resume=never"))
    raise ConfigError(f"{where}: no checkpoint found there (expected {META_FILE} or "
                      "step_* checkpoint folders)")


def find_checkpoint_everywhere(resume: str, run_dir: Path, log: Callable[[str], None] = lambda line: None,
                               gather: Gather = gather_all) -> Path | None:
    """``find_checkpoint`` for every rank of a run (each must call it). The first rank of each
    node looks and verifies, so that a checkpoint is hashed once per node, not once per rank;
    every rank then takes that verdict, error included. Nodes that disagree (they see different
    files) stop every rank with one error."""
    if resume == "never":
        return None
    leader = node_leader(gather)
    verdicts = gather((socket.gethostname(), look_for_checkpoint(resume, run_dir) if leader else None))
    verdicts = [(host, verdict) for host, verdict in verdicts if verdict is not None]  # one per node
    if len({verdict for _, verdict in verdicts}) > 1:
        raise LoadFailed("the nodes disagree about the checkpoint to resume from: "
                         + "; ".join(f"{host}: {describe_verdict(verdict)}" for host, verdict in verdicts)
                         + "; every node must see the same checkpoint files")
    kind, found, detail = verdicts[0][1]
    if kind == "found":
        for line in detail:
            log(line)
        return None if found is None else Path(found)
    raise {"damaged": DamagedCheckpoint, "refused": ConfigError}.get(kind, LoadFailed)(found)


def look_for_checkpoint(resume: str, run_dir: Path) -> tuple:
    """What ``find_checkpoint`` concludes here, as data every rank can receive: ("found", path
    or None, lines logged), or (kind of error, its message, ())."""
    logged: list[str] = []
    try:
        path = find_checkpoint(resume, run_dir, log=logged.append)
    except DamagedCheckpoint as error:
        return "damaged", str(error), ()
    except ConfigError as error:
        return "refused", str(error), ()
    except Exception as error:  # a file that cannot be read, ...
        return "failed", f"finding the checkpoint to resume from failed ({describe_failure(error)})", ()
    return "found", None if path is None else str(path), tuple(logged)


def best_checkpoint(path: Path) -> Path:
    """The checkpoint that ``best`` names in a run dir or its checkpoints folder (``txtrain-sample
    --best``)."""
    for folder in (path / "checkpoints", path):
        if (folder / BEST_POINTER).is_file():
            best = Checkpoints(folder).best()
            if best is None:
                raise ConfigError(f"{folder / BEST_POINTER} names no checkpoint that is there")
            return best
    raise ConfigError(f"{path}: no best checkpoint (checkpoints/{BEST_POINTER}); a run keeps one "
                      "when it trains with train.patience")


def describe_verdict(verdict: tuple) -> str:
    kind, found, _ = verdict
    if kind == "found":
        return f"resumes from {found}" if found else "finds no checkpoint"
    return found


def read_meta(path: Path) -> dict:
    return torch.load(path / META_FILE, map_location="cpu", weights_only=True)


def load_state(path: Path, state: dict) -> None:
    """Fill ``state`` (tensors shaped and placed as this rank holds them) from the checkpoint
    at ``path``, whatever layout wrote it. Keys absent from ``state`` are not read. Collective:
    a rank that cannot read its part stops them all (``LoadFailed``)."""
    agreed_load(path, "reading the model and optimizer state", lambda: read_state(path, state))


def read_state(path: Path, state: dict) -> None:
    with single_process_is_fine():
        from torch.distributed import checkpoint as dcp

        dcp.load(state, storage_reader=safe_reader(path / STATE_DIR), no_dist=not dist.is_initialized())


def load_state_keys(path: Path) -> set[str]:
    """The keys of the tensors and values in a checkpoint's state (``optimizer.state.<name>.exp_avg``),
    read on every rank; one that cannot read them stops them all (``LoadFailed``)."""
    def read_keys() -> set[str]:
        return set(read_metadata(path / STATE_DIR).state_dict_metadata)

    return agreed_load(path, "reading the list of its saved state", read_keys)


def agreed_load(path: Path, phase: str, action: Callable):
    try:
        return agree(phase, action)
    except PhaseFailed as failure:
        # The message says it all, the same on every rank: no rank's own cause appended to it.
        raise LoadFailed(f"loading checkpoint {path} failed ({failure})") from None


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Load a checkpoint's weights into a plain (unwrapped, unsharded) model."""
    from txtrain.model.base import tied_aliases

    aliases = tied_aliases(model)
    state = {"model": {k: v for k, v in model.state_dict().items() if k not in aliases}}
    load_state(path, state)
    model.load_state_dict({**state["model"], **{alias: state["model"][name] for alias, name in aliases.items()}})


# --- the state's metadata, unpickled without running code ---------------------------------------
METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's pickled index of the state
METADATA_CLASSES = {  # what torch.distributed.checkpoint's metadata is made of (torch 2.6 - 2.13)
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
        "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},  # and the dtypes (below)
    "torch.serialization": {"_get_layout"},  # torch.strided from its name
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path", "PurePath"},
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path", "PurePath"},
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "tuple", "list", "dict", "int", "float", "str", "bytes", "bool"},
}


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` file admitting only ``METADATA_CLASSES`` and torch's dtypes:
    what a pickle names is all it can call, so a file naming ``os.system`` or ``builtins.exec``
    is refused before anything of it runs."""

    def find_class(self, module: str, name: str):
        allowed = name in METADATA_CLASSES.get(module, ())
        if module == "torch" and not allowed:  # vars(): torch's lazy __getattr__ would import
            allowed = isinstance(vars(torch).get(name), torch.dtype)
        if not allowed:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}")
        return super().find_class(module, name)


def read_metadata(state_dir: Path):
    """The torch.distributed.checkpoint ``Metadata`` of ``state_dir``, read with
    ``MetadataUnpickler``; ``UnsafeCheckpoint`` where it names anything else."""
    from torch.distributed.checkpoint.metadata import Metadata

    data = (state_dir / METADATA_FILE).read_bytes()
    try:
        metadata = MetadataUnpickler(io.BytesIO(data)).load()
        if not isinstance(metadata, Metadata):
            raise pickle.UnpicklingError(f"it holds a {type(metadata).__name__}, not a Metadata")
        for info in (metadata.storage_data or {}).values():  # the shards it reads: here, by name
            name = getattr(info, "relative_path", None)
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                raise pickle.UnpicklingError(f"it names a shard outside {STATE_DIR}/ ({name!r})")
    except Exception as error:  # pickle's errors are many: UnpicklingError, EOFError, ...
        reason = str(error) if isinstance(error, pickle.UnpicklingError) else describe_failure(error)
        raise UnsafeCheckpoint(
            f"refusing checkpoint {state_dir.parent}: its {STATE_DIR}/{METADATA_FILE} is not plain "
            f"checkpoint metadata ({reason}); unpickling it could run code. Load only checkpoints "
            "you trust; share models as safetensors (txtrain-export)") from None
    return metadata


def check_metadata(folder: Path) -> None:
    """Refuse (``UnsafeCheckpoint``) a checkpoint whose state metadata would run code."""
    if (folder / STATE_DIR / METADATA_FILE).is_file():
        read_metadata(folder / STATE_DIR)


def safe_reader(state_dir: Path):
    """A torch.distributed.checkpoint reader of ``state_dir`` whose metadata is read with
    ``MetadataUnpickler`` (torch's own reads it with a plain ``pickle.load``)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(state_dir)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(state_dir))
