"""Launching: torchrun on two "nodes", SLURM's tasks without torchrun, txtrain starting its own
processes, ``torchrun txtrain`` from the project root, and the errors of a wrong launch. These
start real launchers (the strategies' own runs, in test_parallel.py, are forked ranks)."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import forked
import txtrain
from conftest import losses, run_txtrain
from test_parallel import RUN, STEPS, assert_same_losses
from test_parallel import reference  # noqa: F401 (a fixture: the one-process run, made once here too)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, cwd: Path, torchrun_args=(), timeout: float = 300):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                *(torchrun_args or ["--standalone"])]
    return subprocess.run([*launcher, "-m", "txtrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_two_nodes_train_together(reference, tmp_path):
    """Two torchrun invocations, one per "node", meet over a c10d rendezvous on loopback; with
    no run dir given they also agree on the one Hydra makes."""
    rendezvous = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=localhost:{free_port()}",
                  "--rdzv-id=two-nodes"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1",
                               *rendezvous, "-m", "txtrain", "parallel=ddp", *RUN],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]
    run_dirs = list(tmp_path.glob("outputs/*/*"))
    assert len(run_dirs) == 1
    assert_same_losses(run_dirs[0], losses(reference), 1e-4, range(1, STEPS + 1))


def test_slurm_tasks_form_a_group_without_torchrun(reference, tmp_path):
    """Two processes started the way srun starts tasks: SLURM's variables only, no torchrun.
    They must train as one process does."""
    slurm = {"SLURM_NTASKS": "2", "SLURM_NODELIST": "localhost", "MASTER_PORT": str(free_port())}
    tasks = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(slurm, SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), PYTHONWARNINGS="ignore",
                   OMP_NUM_THREADS="1")
        tasks.append(forked.start(["parallel=ddp", "train.micro_batch_size=8", *RUN,
                                   f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env))
    for task in tasks:
        done = task.finish(300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert_same_losses(tmp_path / "run", losses(reference), 1e-4, range(1, STEPS + 1))
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2


def test_launch_starts_the_processes_itself_and_only_rank_0_writes(tmp_path):
    result = run_txtrain("parallel=ddp", "launch.nproc_per_node=2", *RUN, "train.steps=4",
                         "train.save_every=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done: step 4") == 1  # one summary, from rank 0
    [run_dir] = tmp_path.glob("outputs/*/*")
    assert {p.name for p in run_dir.iterdir()} == {  # no loss.png: plot=false
        ".hydra", "checkpoints", "eval.jsonl", "memory.json", "metrics.jsonl", "run.json", "txtrain.log"}
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4
    shards = {p.name for p in (run_dir / "checkpoints" / "step_000004" / "state").iterdir()}
    assert shards == {".metadata", "__0_0.distcp", "__1_0.distcp"}


def test_torchrun_runs_the_package_folder_from_the_project_root(tmp_path):
    """`torchrun txtrain ...` runs txtrain/__main__.py as a script, not as a module (one worker
    is enough to show it)."""
    project_root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1",
         "txtrain", "parallel=fsdp", *RUN, "train.steps=2", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=project_root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: step 2" in result.stdout


def txtrain_frames(stderr: str) -> list[str]:
    """The traceback lines of txtrain's own code: files inside the package, wherever the
    checkout and its venv lie (in a checkout named txtrain, torch's frames under
    txtrain/.venv/ are not ours)."""
    package = Path(txtrain.__file__).resolve().parent
    return [line.strip() for line in stderr.splitlines()
            if (frame := re.match(r'\s*File "([^"]+)"', line))
            and Path(frame.group(1)).resolve().is_relative_to(package)]


def test_a_multi_process_strategy_in_one_process_is_a_one_line_error(tmp_path):
    result = torchrun("parallel=pipeline", *RUN, nproc=1, cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode != 0
    assert errors == [errors[0]] and "at least 2 processes" in errors[0]
    # torchrun reports the failed worker with a traceback of its own, but none is ours.
    assert txtrain_frames(result.stderr) == []
