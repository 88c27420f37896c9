"""Stopping and dying in one process: SIGTERM saves the current step and exits with its own
status; after SIGTERM or kill -9, rerunning the same command continues to the same losses as a
run never stopped, bitwise. (Under ddp: test_stopping_ddp.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forked
from conftest import make_config
from txtrain.checkpoint import verify
from txtrain.config import ConfigError
from txtrain.stopping import INTERRUPTED_STATUS

STEPS = 30
RUN = [f"train.steps={STEPS}", "train.log_every=1", "train.eval_every=0", "train.save_every=5",
       "task.n_eval=50", "model.n_layer=1", "progress=false", "plot=false"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "txtrain", "parallel=ddp"]


def environment() -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def start(command: list[str], cwd: Path) -> subprocess.Popen:
    """A real process (here: torchrun, whose agent and workers the test is about)."""
    return subprocess.Popen(command, cwd=cwd, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def start_txtrain(args: list[str], cwd: Path) -> forked.Forked:
    """``txtrain *args`` in one process of its own, forked with torch already imported (see
    forked.py): its own signal handlers, exit status, output and OMP_NUM_THREADS, as a fresh
    process."""
    return forked.start(args, cwd, environment())


def finish(process: subprocess.Popen | forked.Forked) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_txtrain(args: list[str], cwd: Path) -> list[subprocess.CompletedProcess]:
    """``txtrain *args`` to the end in a forked process."""
    return [start_txtrain(args, cwd).finish(300)]


def wait_for_steps(process: subprocess.Popen | forked.Forked, cwd: Path, steps: int) -> Path:
    """Wait until the run (its dir found under ``cwd``) has logged ``steps`` steps."""
    deadline = time.monotonic() + 180
    while True:
        try:
            logged = [m for m in cwd.rglob("metrics.jsonl") if len(m.read_text().splitlines()) >= steps]
        except FileNotFoundError:  # a checkpoint's .tmp folder renamed while the search walked it
            logged = []
        if logged:
            return logged[0].parent
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)


def worker(agent: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of ``rank``."""
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    for pid in children:
        if f"\0RANK={rank}\0" in "\0" + Path(f"/proc/{pid}/environ").read_text():
            return int(pid)
    raise AssertionError(f"torchrun has no worker of rank {rank} among {children}")


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_continues_exactly(run_dir: Path, whole: Path, tolerance: float = 0.0) -> None:
    """Every step was logged once (a resumed run drops what the dead one logged after its
    checkpoint), with the uninterrupted run's loss at that step."""
    expected = {r["step"]: r["loss"] for r in records(whole)}
    got = records(run_dir)
    assert [r["step"] for r in got] == sorted(expected)
    worst = max(abs(r["loss"] - expected[r["step"]]) / abs(expected[r["step"]]) for r in got)
    assert worst <= tolerance, f"relative loss difference {worst:.2e} > {tolerance}"


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted run in one process."""
    root = tmp_path_factory.mktemp("whole")
    [done] = run_txtrain([*RUN, f"hydra.run.dir={root / 'single'}"], root)
    assert done.returncode == 0, done.stderr[-2000:]
    return {"single": root / "single"}


# --- one process ------------------------------------------------------------------------------
@pytest.mark.parametrize("sig, extra", [(signal.SIGTERM, []), (signal.SIGUSR1, ["train.stop_signal=SIGUSR1"])])
def test_a_stop_signal_saves_the_step_and_the_rerun_continues_exactly(tmp_path, whole, sig, extra):
    command = [*RUN, *extra, f"hydra.run.dir={tmp_path / 'run'}"]
    process = start_txtrain(command, tmp_path)
    wait_for_steps(process, tmp_path, 7)
    process.send_signal(sig)
    stopped = finish(process)
    assert stopped.returncode == INTERRUPTED_STATUS, stopped.stderr
    step = max(r["step"] for r in records(tmp_path / "run"))
    assert step < STEPS and f"stopped by {signal.Signals(sig).name} after step {step}" in stopped.stderr
    verify(tmp_path / "run" / "checkpoints" / f"step_{step:06d}")  # the step it stopped at, whole

    [again] = run_txtrain(command, tmp_path)
    assert again.returncode == 0, again.stderr
    assert_continues_exactly(tmp_path / "run", whole["single"])  # bitwise


def test_an_unknown_stop_signal_is_a_config_error():
    with pytest.raises(ConfigError, match="SIGFOO is not a signal name"):
        make_config("train.stop_signal=SIGFOO")


def test_after_kill_9_the_rerun_continues_from_the_last_checkpoint_exactly(tmp_path, whole):
    command = [*RUN, f"hydra.run.dir={tmp_path / 'run'}"]
    process = start_txtrain(command, tmp_path)
    wait_for_steps(process, tmp_path, 17)
    process.kill()
    assert finish(process).returncode == -signal.SIGKILL
    [again] = run_txtrain(command, tmp_path)
    assert again.returncode == 0 and "resumed from" in again.stderr + again.stdout, again.stderr
    assert_continues_exactly(tmp_path / "run", whole["single"])


def test_a_stop_request_saves_before_a_due_evaluation(tmp_path, monkeypatch):
    """A launcher kills its workers some seconds after SIGTERM: the checkpoint comes first, and
    the evaluation due at that step is skipped."""
    from txtrain.stopping import Interrupted
    from txtrain.train import Trainer

    train_step = Trainer.train_step

    def signal_at_step_4(self, batch, lr):
        if self.step == 3:  # the update that ends step 4
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(self, batch, lr)

    monkeypatch.setattr(Trainer, "train_step", signal_at_step_4)
    trainer = Trainer(make_config(*RUN, "train.eval_every=2", "train.save_every=0"), tmp_path)
    with pytest.raises(Interrupted, match="after step 4"):
        trainer.fit()
    evaluated = [json.loads(line)["step"] for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert evaluated == [2]  # not 4: the stop came first
    verify(tmp_path / "checkpoints" / "step_000004")
