"""Stopping: SIGTERM saves the current step and exits with its own status; after SIGTERM or
kill -9, rerunning the same command continues to the same losses as a run never stopped."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_config, run_txtrain
from txtrain.checkpoint import verify
from txtrain.config import ConfigError
from txtrain.stopping import INTERRUPTED_STATUS

RUN = ["train.steps=60", "train.log_every=1", "train.eval_every=0", "train.save_every=0", "progress=false"]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def start_and_signal(run_dir: Path, sig: int, after_steps: int, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    process = subprocess.Popen([sys.executable, "-m", "txtrain", *RUN, *extra, f"hydra.run.dir={run_dir}"],
                               cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after_steps):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


@pytest.mark.parametrize("sig, extra", [(signal.SIGTERM, []), (signal.SIGUSR1, ["train.stop_signal=SIGUSR1"])])
def test_a_stop_signal_saves_the_step_and_the_rerun_continues_exactly(tmp_path, sig, extra):
    stopped = start_and_signal(tmp_path / "run", sig, 5, *extra)
    assert stopped.returncode == INTERRUPTED_STATUS, stopped.stderr
    step = max(losses(tmp_path / "run"))
    assert step < 60 and f"stopped by {signal.Signals(sig).name} after step {step}" in stopped.stderr
    checkpoint = tmp_path / "run" / "checkpoints" / f"step_{step:06d}"
    verify(checkpoint)

    again = run_txtrain(*RUN, *extra, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    whole = run_txtrain(*RUN, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert losses(tmp_path / "run") == losses(tmp_path / "whole")  # bitwise, every step


def test_an_unknown_stop_signal_is_a_config_error():
    with pytest.raises(ConfigError, match="SIGFOO is not a signal name"):
        make_config("train.stop_signal=SIGFOO")


def test_after_kill_9_the_rerun_continues_from_the_last_checkpoint_exactly(tmp_path):
    killed = start_and_signal(tmp_path / "run", signal.SIGKILL, 17, "train.save_every=5")
    assert killed.returncode == -signal.SIGKILL
    assert max(losses(tmp_path / "run")) < 60  # it died mid-run, some steps after a checkpoint
    again = run_txtrain(*RUN, "train.save_every=5", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed from" in again.stderr + again.stdout
    whole = run_txtrain(*RUN, "train.save_every=5", f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    whole_losses = losses(tmp_path / "whole")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 60  # steps between the checkpoint and the kill ran twice ...
    assert all(r["loss"] == whole_losses[r["step"]] for r in records)  # ... alike, as did the rest
    assert set(whole_losses) == {r["step"] for r in records}
