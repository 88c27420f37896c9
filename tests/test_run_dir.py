"""Who writes where: a run dir belongs to one run at a time (a second run is refused in one line
and changes nothing; a run killed with kill -9 leaves no lock that blocks the rerun), runs and
sweeps started in the same second get a folder each, a refused command takes away the folders
it made and only those, and a stop request during start-up exits 75 and leaves no empty run dir."""

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

import forked
from conftest import call_txtrain
from txtrain.stopping import INTERRUPTED_STATUS

TINY = ["train.steps=2", "train.batch_size=16", "train.eval_every=0", "task.n_eval=10",
        "model.n_layer=1", "progress=false", "plot=false"]
# Long enough to be caught in the middle; save_every so that a killed run has a checkpoint.
LONGER = [*TINY, "train.steps=30", "train.log_every=1", "train.save_every=10"]
SAME_SECOND = "2026-11-27T14:31:45"  # what every process of one launch agrees on (distributed.start_time)


def start(args: list[str], cwd: Path, **env) -> forked.Forked:
    """The command line in a process of its own, started with torch already imported."""
    return forked.start(args, cwd, dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **env))


def start_afresh(args: list[str], cwd: Path) -> subprocess.Popen:
    """The command line in a new interpreter, which spends seconds importing torch."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "txtrain", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen | forked.Forked) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=180)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def wait_until(ready, process: subprocess.Popen | forked.Forked, poll: float = 0.02) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, finish(process).stderr[-3000:]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(poll)


def logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every file and folder under ``folder``: content and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.is_file() and
                                         hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.rglob("*"))}


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


# --- one run per run dir ----------------------------------------------------------------------
def test_a_second_run_in_a_busy_run_dir_is_refused_in_one_line_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    command = [*LONGER, f"hydra.run.dir={run_dir}"]
    first = start(command, tmp_path)
    wait_until(lambda: logged_steps(run_dir) >= 1, first)
    first.send_signal(signal.SIGSTOP)  # frozen: whatever changes in its run dir now is the second's
    try:
        before = snapshot(run_dir)
        second = call_txtrain(*command)
        after = snapshot(run_dir)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.status == 2, second.stderr
    error = one_error_line(second.stderr)
    assert "in use" in error and f"pid {first.pid}" in error, error
    assert after == before  # no log line, no .hydra rewrite, no checkpoint
    done = finish(first)
    assert done.returncode == 0, done.stderr[-3000:]
    assert logged_steps(run_dir) == 30
    assert not (run_dir / ".lock").exists()  # a run that ends leaves no lock file


def test_after_kill_9_the_lock_left_behind_does_not_block_the_same_command(tmp_path):
    run_dir = tmp_path / "run"
    command = [*LONGER, f"hydra.run.dir={run_dir}"]
    first = start(command, tmp_path)
    wait_until(lambda: (run_dir / "checkpoints" / "latest").exists(), first)
    first.kill()
    first.wait(timeout=60)
    assert (run_dir / ".lock").exists()  # the dead run's lock file is still there ...
    again = call_txtrain(*command)  # ... and does not stop the same command resuming
    assert again.status == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout + again.stderr
    assert logged_steps(run_dir) == 30


# --- a folder each, even in the same second ---------------------------------------------------
def test_two_sweeps_started_in_the_same_second_get_a_folder_each_with_all_their_jobs(tmp_path):
    sweeps = {("0.001", "0.003"): "optim.lr=1e-3,3e-3", ("0.01", "0.03"): "optim.lr=1e-2,3e-2"}
    processes = [start(["-m", values, *TINY], tmp_path, TXTRAIN_STARTED=SAME_SECOND)
                 for values in sweeps.values()]
    done = [finish(p) for p in processes]
    assert [d.returncode for d in done] == [0, 0], [d.stderr[-3000:] for d in done]
    folders = sorted(tmp_path.glob("multirun/*/*"))
    assert len(folders) == 2, folders
    found = {}
    for folder in folders:
        jobs = sorted(p for p in folder.iterdir() if p.name.isdigit())
        assert [job.name for job in jobs] == ["0", "1"]
        lrs = tuple(str(OmegaConf.load(job / ".hydra" / "config.yaml").optim.lr) for job in jobs)
        assert all((job / "run.json").is_file() and logged_steps(job) == 1 for job in jobs)
        sweep_overrides = OmegaConf.load(folder / "multirun.yaml").hydra.overrides.task
        found[lrs] = [o for o in sweep_overrides if o.startswith("optim.lr=")][0]
    assert found == {lrs: values for lrs, values in sweeps.items()}


def test_two_runs_started_in_the_same_second_get_a_run_dir_each(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TXTRAIN_STARTED", SAME_SECOND)
    other = start(TINY, tmp_path)
    here = call_txtrain(*TINY)  # in this process, while the other one starts up and trains
    there = finish(other)
    assert (here.status, there.returncode) == (0, 0), (here.stderr[-3000:], there.stderr[-3000:])
    run_dirs = sorted(p.parent for p in tmp_path.rglob("run.json"))
    assert len(run_dirs) == 2, run_dirs
    assert all(logged_steps(run_dir) == 1 for run_dir in run_dirs)
    reported = {line.rsplit("run dir ", 1)[1] for out in (here.stdout, there.stdout)
                for line in out.splitlines() if line.startswith("done:")}
    assert {Path(tmp_path, r).resolve() for r in reported} == {r.resolve() for r in run_dirs}


# --- a refused command leaves nothing ---------------------------------------------------------
def test_a_refused_command_removes_the_folders_it_made_and_only_those(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TXTRAIN_STARTED", SAME_SECOND)
    for mine in ("mine", "empty_run_dir"):  # the user made these, empty, beforehand
        (tmp_path / mine).mkdir()
    heads = ["model.n_embd=100", "model.n_head=3"]  # refused as the config is read
    too_long = ["task.max_len=200"]  # refused once the run dir is locked and the task built
    # refused once the strategy is built, which on a CPU has a warning to give: not into a log
    warned = ["parallel=dp", "train.micro_batch_size=7"]
    for args in (heads, [*heads, "hydra.run.dir=x/y/z"], [*heads, "hydra.run.dir=mine/y/z"],
                 [*heads, "hydra.run.dir=empty_run_dir"], too_long, [*too_long, "hydra.run.dir=a/b"],
                 [*warned, "hydra.run.dir=c/d"], [*warned, "hydra.run.dir=empty_run_dir"]):
        outcome = call_txtrain(*args)
        assert outcome.status == 2, (args, outcome.stderr)
        one_error_line(outcome.stderr)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["empty_run_dir", "mine"]


# --- stop requests ----------------------------------------------------------------------------
def test_a_stop_request_during_start_up_exits_75_and_leaves_no_run_dir(tmp_path):
    process = start_afresh(TINY, tmp_path)
    wait_until(lambda: any(tmp_path.glob("outputs/*/*")), process, poll=0.005)  # torch still loading
    process.send_signal(signal.SIGTERM)
    done = finish(process)
    assert done.returncode == INTERRUPTED_STATUS, (done.returncode, done.stderr[-3000:])
    assert "stopped by SIGTERM before training started" in done.stderr
    assert not (tmp_path / "outputs").exists()


# --- tests that read tracebacks ---------------------------------------------------------------
def test_our_own_traceback_lines_are_told_apart_wherever_the_checkout_and_its_venv_lie():
    """The most common layout: a checkout named txtrain with its venv inside it, so torch's own
    frames lie under .../txtrain/.venv/... (test_parallel.py reads torchrun's report this way)."""
    from test_launchers import txtrain_frames
    import txtrain

    package = Path(txtrain.__file__).resolve().parent
    checkout = package.parent
    torch_frame = f'  File "{checkout}/.venv/lib/python3.11/site-packages/torch/distributed/run.py", line 9'
    elsewhere = Path(package.anchor, "elsewhere", "txtrain", ".venv")  # another clone named txtrain
    clone_frame = f'  File "{elsewhere}/lib/python3.12/site-packages/torch/__init__.py", line 3'
    ours = f'  File "{package / "cli.py"}", line 80, in run'
    report = "\n".join(["Traceback (most recent call last):", torch_frame, clone_frame, ours,
                        "txtrain.config.ConfigError: error: txtrain said so"])
    assert txtrain_frames(report) == [ours.strip()]
    assert txtrain_frames("\n".join([torch_frame, clone_frame])) == []
