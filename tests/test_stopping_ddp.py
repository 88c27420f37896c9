"""Stopping and dying under ddp over two processes: after a signal to one rank, the rerun
continues to the same losses as a group never stopped (within 1e-6); after a kill -9 of one
rank, torchrun --max-restarts reruns the group, which continues from its latest checkpoint to
the same losses. (Rerunning it by hand is the same resume; one process's kill -9 and rerun:
test_stopping.py.) The groups stopped are real torchrun groups (its agent's part is tested);
the reference and the reruns are forked ranks."""

import os
import signal
from pathlib import Path

import pytest

from conftest import run_ranks
from test_stopping import (RUN, STEPS, TORCHRUN, assert_continues_exactly, finish, records, start,
                           verify, wait_for_steps, worker)
from txtrain.stopping import INTERRUPTED_STATUS


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted group: ddp over two ranks."""
    root = tmp_path_factory.mktemp("whole")
    done = run_ranks("parallel=ddp", *RUN, f"hydra.run.dir={root / 'ddp'}", cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"ddp": root / "ddp"}


def test_ddp_a_signal_to_one_rank_stops_both_after_the_same_step(tmp_path, whole):
    command = [*TORCHRUN, *RUN, f"hydra.run.dir={tmp_path / 'run'}"]
    agent = start(command, tmp_path)
    wait_for_steps(agent, tmp_path, 7)
    os.kill(worker(agent, rank=1), signal.SIGTERM)
    stopped = finish(agent)
    step = max(r["step"] for r in records(tmp_path / "run"))  # rank 0's log: it stopped too
    assert step < STEPS and f"after step {step}" in stopped.stderr, stopped.stderr
    assert f"exitcode  : {INTERRUPTED_STATUS}" in stopped.stderr  # torchrun's report of the ranks
    verify(tmp_path / "run" / "checkpoints" / f"step_{step:06d}")
    again = run_ranks(*command[command.index("txtrain") + 1:], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert_continues_exactly(tmp_path / "run", whole["ddp"], tolerance=1e-6)


def test_torchrun_max_restarts_brings_the_group_back_from_the_last_checkpoint(tmp_path, whole):
    # No hydra.run.dir: the restarted workers must find the run dir they were writing to.
    agent = start([*TORCHRUN[:4], "--max-restarts=1", *TORCHRUN[4:], *RUN], tmp_path)
    run_dir = wait_for_steps(agent, tmp_path, 17)
    os.kill(worker(agent, rank=1), signal.SIGKILL)
    done = finish(agent)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [p.parent for p in tmp_path.rglob("metrics.jsonl")] == [run_dir]
    assert "resumed from" in (run_dir / "txtrain.log").read_text()
    assert_continues_exactly(run_dir, whole["ddp"], tolerance=1e-6)
