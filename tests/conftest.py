import os

# One thread per test process, set before torch starts (and inherited by the runs the tests
# start): test files run one per core, and the spinning thread pools of two processes on two
# cores would slow both several times over. Tiny models gain nothing from a second thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite tests the CPU paths, on a GPU machine too (its tolerances are the CPU's, and its
# ranks share one machine with gloo). GPUs are tested by scripts/gpu_check.py. Hidden before
# torch starts: the runs forked from a process that had looked at CUDA could not use it.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import contextlib
import copy
import functools
import io
import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import forked
from txtrain.cli import compose_config
from txtrain.config import Config
from txtrain.distributed import STARTED_VARIABLE

SHARED = Path(__file__).resolve().parents[2] / "shared"
# Settings of every test run, for the keys its own overrides leave alone: drawing loss.png
# costs about half a second a run, and the tests that look at it say plot=true.
QUIET = ("progress=false", "plot=false")


def quiet(args) -> tuple[str, ...]:
    """``args`` (a txtrain command line) and the QUIET settings it does not make itself."""
    keys = {str(arg).split("=", 1)[0] for arg in args}
    return (*args, *(setting for setting in QUIET if setting.split("=", 1)[0] not in keys))


def make_config(*overrides: str) -> Config:
    """Compose the config exactly as the command line would, from overrides. Composing takes
    Hydra about a fifth of a second, more than a small test run's steps: each distinct command
    line is composed once per test process, and every call gets a copy of its own."""
    return copy.deepcopy(composed(quiet(overrides)))


@functools.cache
def composed(overrides: tuple[str, ...]) -> Config:
    return compose_config(*overrides)


def losses(run_dir: Path) -> dict[int, float]:
    """Step -> training loss from a run's metrics.jsonl; where a resumed run wrote a step
    again, its latest record."""
    records = (json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines())
    return {record["step"]: record["loss"] for record in records}


def interrupted_copy(full: Path, copy: Path, saved_at: int, last: int) -> Path:
    """``full``'s run dir as a run killed after its checkpoint at ``saved_at`` would have left
    it: the later checkpoint (``last``) gone, ``latest`` pointing back, no metrics yet."""
    shutil.copytree(full, copy)
    shutil.rmtree(copy / "checkpoints" / f"step_{last:06d}")
    (copy / "checkpoints" / "latest").write_text(f"step_{saved_at:06d}\n")
    (copy / "metrics.jsonl").unlink()
    return copy


def run_txtrain(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process (forked with torch already imported: see
    forked.py)."""
    return forked.run(quiet(args), cwd, dict(os.environ, PYTHONWARNINGS="ignore"), timeout)[0]


def run_ranks(*args: str, nproc: int = 2, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``txtrain *args`` as ``nproc`` ranks started as torchrun starts them, forked with torch
    imported (forked.py); one outcome: the first failed rank's status (else 0), rank 0's
    output, every rank's stderr. The launcher itself is tested under real torchrun."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    outcomes = forked.run(quiet(args), cwd, env, timeout, ranks=nproc)
    status = next((o.returncode for o in outcomes if o.returncode != 0), 0)
    stderr = "".join(f"[rank {rank}] {o.stderr}" for rank, o in enumerate(outcomes))
    return subprocess.CompletedProcess(outcomes[0].args, status, outcomes[0].stdout, stderr)


@pytest.fixture
def config():
    return make_config


@dataclass
class Outcome:
    status: int
    stdout: str
    stderr: str


def call_txtrain(*args: str) -> Outcome:
    """Run the command line in this process: much faster than ``run_txtrain`` where a
    mistake is refused before any training starts."""
    from hydra.core.global_hydra import GlobalHydra

    from txtrain import cli

    out, err = io.StringIO(), io.StringIO()
    status = 0
    argv = sys.argv
    # Hydra points the logging handlers at the run dir, which a refused command removes: put
    # back what the tests had, or later messages would fail to open that file.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    sys.argv = ["txtrain", *quiet(args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as leaving:
        status = leaving.code if isinstance(leaving.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()
        # The start time is handed down in the environment: later runs of this process's
        # children must not inherit this one's.
        os.environ.pop(STARTED_VARIABLE, None)
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
    return Outcome(status, out.getvalue(), err.getvalue())


# The test files that take longest, first. Test files are handed to the test processes in
# collection order as each process frees up (pytest-xdist, --dist loadfile with
# --no-loadscope-reorder): a long file handed out last would leave the others idle at the end.
LONGEST_FIRST = ["test_parallel.py", "test_stopping_ddp.py", "test_launchers.py", "test_stopping.py",
                 "test_training.py", "test_masked_lm.py", "test_pipeline_tied.py", "test_scripts.py",
                 "test_gpu_check.py", "test_experiments.py", "test_seq2seq.py", "test_early_stopping.py",
                 "test_export.py", "test_bench.py", "test_reliability.py", "test_checkpoint_faults.py",
                 "test_bad_input.py"]


def pytest_collection_modifyitems(items):
    order = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(order)))  # stable: a file keeps its order
