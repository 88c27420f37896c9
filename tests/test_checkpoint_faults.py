"""Checkpoints under faults. A save or a load that fails on one rank (or on all) ends the same
way on every rank, under ddp x2 with faults injected by tests/fault_launcher.py: a save is
reported by all and training goes on, a load stops all with one error line; no rank is left
waiting. A full disk (a real, small tmpfs) fails a save without a traceback or leftovers. A
step's checkpoint from a replaced run is written anew, safely; the newest checkpoint is the
one with the highest step number, whatever the `latest` pointer says or the names sort to."""

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import forked
from conftest import call_txtrain, make_config, quiet, run_ranks
from txtrain.checkpoint import Checkpoints, SaveFailed, find_checkpoint, load_state, step_of, verify
from txtrain.model.base import tied_aliases
from txtrain.resume import CheckpointMeta
from txtrain.sample import main as sample
from txtrain.stopping import INTERRUPTED_STATUS
from txtrain.train import Trainer

TESTS = Path(__file__).resolve().parent
SMALL = ["train.log_every=1", "train.eval_every=0", "task.n_eval=10", "model.n_layer=1", "model.n_embd=32"]


def train(run_dir: Path, *overrides: str) -> Trainer:
    trainer = Trainer(make_config(*SMALL, *overrides), run_dir)
    trainer.fit()
    return trainer


def save_steps(directory: Path, steps, keep_last: int = 0) -> Checkpoints:
    """Checkpoints of a one-tensor state whose value is the step."""
    checkpoints = Checkpoints(directory, keep_last=keep_last)
    for step in steps:
        checkpoints.save(step, {"w": torch.full((4,), float(step))}, {"step": step})
    return checkpoints


def value_in(checkpoint: Path) -> float:
    state = {"w": torch.zeros(4)}
    load_state(checkpoint, state)
    return state["w"][0].item()


def names(paths) -> list[str]:
    return [p.name for p in paths]


# --- order, replacement, the pointer ---------------------------------------------------------
def test_checkpoints_are_ordered_by_step_number_past_step_999999(tmp_path):
    checkpoints = save_steps(tmp_path / "checkpoints", [999_000, 999_500, 1_000_000], keep_last=2)
    assert names(checkpoints.saved()) == ["step_999500", "step_1000000"]  # the newest two
    assert checkpoints.latest().name == "step_1000000"
    assert find_checkpoint("auto", tmp_path).name == "step_1000000"


def test_a_stale_latest_pointer_does_not_hide_a_newer_whole_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    train(run, "train.steps=2", "train.save_every=1")
    (run / "checkpoints" / "latest").write_text("step_000001\n")  # as if rank 0 died before updating it
    assert Checkpoints(run / "checkpoints").latest().name == "step_000002"
    assert Trainer(make_config(*SMALL, "train.steps=3"), run).resumed_from.name == "step_000002"
    capsys.readouterr()
    sample([str(run), "--prompt", "1 2", "--max-new-tokens", "1"])
    assert "step_000002 (step 2)" in capsys.readouterr().err


def test_resuming_from_an_earlier_step_writes_the_later_checkpoints_anew(tmp_path, caplog):
    run = tmp_path / "run"
    train(run, "train.steps=6", "train.save_every=2")  # saves 2, 4, 6
    first = CheckpointMeta.load(run / "checkpoints" / "step_000004").last_loss
    with caplog.at_level(logging.INFO, logger="txtrain"):
        again = train(run, "train.steps=4", "train.save_every=2", "optim.lr=1e-2",
                      f"resume={run / 'checkpoints' / 'step_000002'}")
    step_4 = run / "checkpoints" / "step_000004"
    verify(step_4)
    assert CheckpointMeta.load(step_4).last_loss == again.last_loss != first  # this run's, not the first's
    aliases = tied_aliases(again.model)  # the tied head is saved once, as the embedding
    weights = {name: tensor for name, tensor in again.model.state_dict().items() if name not in aliases}
    state = {"model": {name: torch.zeros_like(tensor) for name, tensor in weights.items()}}
    load_state(step_4, state)
    assert all(torch.equal(state["model"][name], weights[name]) for name in weights)
    # The replaced run's step 6 is gone: it would pass for this run's newest.
    assert names(Checkpoints(run / "checkpoints").saved()) == ["step_000002", "step_000004"]
    assert "deleted step_000006" in caplog.text
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_crash_while_a_checkpoint_is_replaced_leaves_that_step_whole(tmp_path, monkeypatch):
    directory = tmp_path / "checkpoints"
    save_steps(directory, [5, 10])
    replace, crashed = os.replace, []

    def crash_once_the_old_one_is_aside(source, target):
        if crashed or Path(source).name == ".step_000010.tmp":
            crashed.append(source)  # from here on nothing more happens: not even putting it back
            raise OSError(5, "Input/output error")
        return replace(source, target)

    monkeypatch.setattr(os, "replace", crash_once_the_old_one_is_aside)
    with pytest.raises(SaveFailed, match="saving the checkpoint of step 10 failed"):
        Checkpoints(directory).save(10, {"w": torch.full((4,), 99.0)}, {"step": 10})
    monkeypatch.undo()
    assert "step_000010" not in names(directory.iterdir())  # the crash's moment: only the copy aside
    found = find_checkpoint("auto", tmp_path)
    assert step_of(found) == 10 and value_in(found) == 10.0  # the old one, whole
    Checkpoints(directory).save(10, {"w": torch.full((4,), 99.0)}, {"step": 10})  # the next try
    assert sorted(names(directory.iterdir())) == ["latest", "step_000005", "step_000010"]  # nothing else left
    assert value_in(directory / "step_000010") == 99.0


# --- a full disk -----------------------------------------------------------------------------
@contextlib.contextmanager
def tmpfs(folder: Path, size: str):
    """A real small filesystem of ``size`` (``9m``, ``64k``) mounted on ``folder`` (made here)
    while the block runs; the test is skipped where one cannot be mounted (it needs root)."""
    folder.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small filesystem")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        close_log_files_in(folder)  # a command line run in this process keeps its log file open
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(folder)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 9 MB tmpfs: one checkpoint of the default model with AdamW (5.8 MB) fits, two do not."""
    with tmpfs(tmp_path / "disk", "9m") as disk:
        yield disk


def close_log_files_in(folder: Path) -> None:
    loggers = [logging.root, *(logger for logger in logging.Logger.manager.loggerDict.values()
                               if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(folder):
                logger.removeHandler(handler)
                handler.close()


def test_a_full_disk_fails_the_save_in_one_line_and_the_run_goes_on(small_disk, tmp_path):
    run = small_disk / "run"
    done = call_txtrain(f"hydra.run.dir={run}", "train.steps=2", "train.save_every=1", "train.eval_every=0",
                        "task.n_eval=10")  # the command line, in this process
    output = done.stdout + done.stderr
    assert done.status == 0, output[-3000:]
    assert "Traceback" not in output and "CheckpointException" not in output
    warnings = [line for line in output.splitlines() if "warning:" in line]
    assert len(warnings) == 1, warnings
    assert "saving the checkpoint of step 2 failed" in warnings[0] and "step_000001) is intact" in warnings[0]
    assert "MiB free" in warnings[0]
    assert sorted(names((run / "checkpoints").iterdir())) == ["latest", "step_000001"]  # no .tmp left
    verify(run / "checkpoints" / "step_000001")
    resumed = Trainer(make_config(f"resume={run / 'checkpoints' / 'step_000001'}", "train.steps=2",
                                  "train.eval_every=0", "task.n_eval=10"), tmp_path / "next")
    assert resumed.resumed_from.name == "step_000001"
    assert resumed.fit()["step"] == 2


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full: a device that is always full")
def test_a_log_the_main_rank_cannot_write_is_reported_once_and_every_rank_trains_on(tmp_path):
    """metrics.jsonl on a device that is always full: its writes fail as on a full disk. Rank 0
    alone writes it; had it raised there, rank 1 would have waited in the next step's
    collectives (until the timeout, 30 minutes) for a rank that had left."""
    run = tmp_path / "run"
    run.mkdir()
    for output in ("metrics.jsonl", "memory.json"):  # one written every step, one at the end
        (run / output).symlink_to("/dev/full")
    done = run_ranks("parallel=ddp", *SMALL, "train.steps=3", "train.save_every=0", f"hydra.run.dir={run}",
                     cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning:" in line]
    assert [w.split("warning: writing ")[1].split(" ")[0] for w in warnings] == ["metrics.jsonl", "memory.json"]
    assert all("No space left on device" in warning for warning in warnings)
    assert json.loads((run / "run.json").read_text())["result"]["step"] == 3  # the other outputs go on


# --- faults on one rank or on all, under ddp x2 ----------------------------------------------
def torchrun_launcher(plan: list[dict], record: Path, cwd: Path, timeout: float = 240):
    """tests/fault_launcher.py under torchrun (2 ranks, gloo); killed whole if it hangs."""
    record.mkdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", FAULT_PLAN=json.dumps(plan),
               FAULT_RECORD=str(record), PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    env.pop("HYDRA_FULL_ERROR", None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               str(TESTS / "fault_launcher.py")]
    agent = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        stdout, stderr = agent.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
        for pid in [agent.pid, *map(int, workers)]:  # torchrun starts each worker in a session of its own
            os.kill(pid, signal.SIGKILL)
        stdout, stderr = agent.communicate()
        pytest.fail(f"a rank was left waiting: no end after {timeout}s\n{stderr[-3000:]}")
    ranks = [[json.loads(line) for line in (record / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    return agent.returncode, stdout + stderr, ranks


@pytest.fixture(scope="module")
def faulty_runs(tmp_path_factory):
    """One torchrun launch, one run after another in the same two processes. First a load
    fault in each phase, on one rank and on all: each run stops. Then a run that resumes and
    meets a save fault in each phase, one step after another, and is stopped (SIGTERM to rank
    1) at a step whose save fails too."""
    root = tmp_path_factory.mktemp("faults")
    run = root / "run"
    train(run, "train.steps=2", "train.save_every=1")  # in one process: any layout resumes it
    args = ["parallel=ddp", *SMALL, "train.steps=12", "train.save_every=1", f"hydra.run.dir={run}"]
    loads = [({"find": [{"ranks": [0]}]}, []),  # only the node's first rank looks
             ({"find": [{"ranks": [1]}]}, [1]),  # two nodes, which disagree
             ({"find": [{"ranks": [0, 1]}]}, [1]),
             ({"meta_read": [{"ranks": [1]}]}, []),
             ({"meta_read": [{"ranks": [0, 1]}]}, []),
             ({"state_read": [{"ranks": [0]}]}, []),
             ({"state_read": [{"ranks": [0, 1]}]}, [])]
    saves = {"prepare": [{"ranks": [0], "steps": [3]}],
             "state": [{"ranks": [1], "steps": [4]},  # in torch.distributed.checkpoint's writer
                       {"ranks": [0, 1], "steps": [5]},
                       {"ranks": [0], "steps": [11]}],  # the step it is stopped at
             "meta": [{"ranks": [0], "steps": [6]}],
             "manifest": [{"ranks": [0], "steps": [7]}],
             "publish": [{"ranks": [0], "steps": [8]}],
             "prune": [{"ranks": [0], "steps": [9]}]}  # after publishing: only a warning
    plan = [{"args": args, "faults": faults, "other_host": other_host} for faults, other_host in loads]
    plan.append({"args": args, "faults": saves, "stop": {"rank": 1, "step": 11}})
    status, output, (zero, one) = torchrun_launcher(plan, root / "record", root)
    assert len(zero) == len(one) == len(plan), output[-3000:]
    return {"status": status, "output": output, "loads": list(zip(zero, one))[:-1], "last": (zero[-1], one[-1]),
            "run": run}


def test_a_load_that_fails_on_one_rank_or_all_stops_all_with_the_same_line(faulty_runs):
    checkpoint = faulty_runs["run"] / "checkpoints" / "step_000002"
    for i, (zero, one) in enumerate(faulty_runs["loads"]):
        assert zero["status"] == one["status"] == 1, (i, zero, one)
        assert zero["error"] == one["error"] and zero["escaped"] is one["escaped"] is None, (i, zero, one)
        assert [line for line in zero["stderr"].splitlines() if line] == [f"error: {zero['error']}"], (i, zero)
        assert one["stderr"].strip() == "", (i, one)  # rank 0 speaks for all
    errors = [zero["error"] for zero, _ in faulty_runs["loads"]]
    assert errors[0].startswith("finding the checkpoint to resume from failed (OSError: [Errno 5]")
    assert errors[1].startswith("the nodes disagree about the checkpoint to resume from: node-of-rank-0: "
                                f"resumes from {checkpoint}; node-of-rank-1: finding")
    assert errors[2].startswith("finding the checkpoint to resume from failed")
    for error, phase, ranks in zip(errors[3:], ["reading meta.pt"] * 2 + ["reading the model and optimizer state"] * 2,
                                   ["rank 1", "ranks 0, 1", "rank 0", "ranks 0, 1"]):
        assert error.startswith(f"loading checkpoint {checkpoint} failed ({phase} on {ranks}: "
                                "OSError: [Errno 5] Input/output error (injected)"), error


def test_a_save_that_fails_on_one_rank_or_all_is_reported_by_all_and_training_goes_on(faulty_runs):
    zero, one = faulty_runs["last"]
    assert zero["escaped"] is one["escaped"] is None, faulty_runs["output"][-3000:]
    assert (zero["hashed"], one["hashed"]) == (1, 0)  # the checkpoint it resumed: hashed once on this node
    assert zero["saves"] == one["saves"]  # every rank ended every save the same way
    outcomes = dict((step, what) for step, what in zero["saves"])
    assert [step for step, what in outcomes.items() if what == "saved"] == [9, 10]
    for step in (3, 4, 5, 6, 7, 8, 11):
        assert outcomes[step].startswith(f"SaveFailed: saving the checkpoint of step {step} failed")
        assert "No space left on device (injected)" in outcomes[step]
    assert "writing the model and optimizer state on rank 1: OSError" in outcomes[4]
    assert "writing the model and optimizer state on ranks 0, 1: OSError" in outcomes[5]
    warnings = [line for line in faulty_runs["output"].splitlines()
                if "warning: saving the checkpoint" in line or "warning: deleting" in line]
    assert len(warnings) == 8 and "deleting old checkpoints (train.keep_last) after saving step_000009" in warnings[6]
    checkpoints = Checkpoints(faulty_runs["run"] / "checkpoints")
    assert names(checkpoints.saved()) == ["step_000001", "step_000002", "step_000009", "step_000010"]
    assert not [p.name for p in checkpoints.directory.iterdir() if p.name.startswith(".")]
    for path in checkpoints.saved():
        verify(path)


def test_a_stop_whose_save_fails_still_stops_every_rank_the_same_way(faulty_runs):
    zero, one = faulty_runs["last"]
    assert zero["status"] == one["status"] == INTERRUPTED_STATUS
    assert f"exitcode  : {INTERRUPTED_STATUS}" in faulty_runs["output"]  # torchrun's report of the ranks
    assert "after step 11" in zero["stderr"] and zero["saves"][-1][0] == 11
    assert "its checkpoint could not be saved" in zero["stderr"]  # not "checkpoint ... saved"


def test_outputs_the_main_rank_cannot_open_at_the_start_stop_every_rank_with_one_line(tmp_path):
    """metrics.jsonl is a folder (a run dir that something else wrote into): rank 0 cannot open
    it. Every rank must stop with that line, not rank 0 alone while rank 1 trains into the
    first step's collectives."""
    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)
    zero, one = forked.run(quiet(["parallel=ddp", *SMALL, "train.steps=3", "train.save_every=0",
                                  f"hydra.run.dir={run}"]), tmp_path, ranks=2)
    assert zero.returncode == one.returncode == 2, (zero.stderr[-2000:], one.stderr[-2000:])  # each ended itself
    assert zero.stderr.strip() == f"error: cannot write {run / 'metrics.jsonl'}: Is a directory"
    assert one.stderr.strip() == ""  # rank 0 speaks for all


def test_overwrite_that_cannot_delete_the_earlier_run_stops_every_rank_with_one_line(tmp_path):
    """resume=never overwrite=true under ddp x2, in a run dir whose tensorboard/ is a mount
    point (rank 0 empties it and fails to remove it: EBUSY). Rank 0 deletes alone; had it
    raised there, rank 1 would have waited for it at the next barrier."""
    run = tmp_path / "run"
    train(run, "train.steps=1", "train.save_every=1")
    with tmpfs(run / "tensorboard", "1m"):
        zero, one = forked.run(quiet(["parallel=ddp", *SMALL, "train.steps=1", "resume=never", "overwrite=true",
                                      f"hydra.run.dir={run}"]), tmp_path, ranks=2)
    assert zero.returncode == one.returncode == 2, (zero.stderr[-2000:], one.stderr[-2000:])
    assert zero.stderr.startswith("error: deleting the earlier run's outputs (overwrite=true) failed on rank 0: "
                                  "OSError: [Errno 16]"), zero.stderr[-2000:]
    assert zero.stderr.count("\n") == 1 and one.stderr.strip() == ""


def test_a_token_cache_that_cannot_be_written_stops_every_rank_with_one_line(tmp_path):
    """task.cache_dir on a 64 KB tmpfs, under ddp x2: the rank that tokenizes meets a full disk
    while the other waits for the cache."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("socrates asks what justice is, and meno cannot say.\n" * 4000)
    with tmpfs(tmp_path / "cache", "64k") as cache:
        zero, one = forked.run(quiet(["parallel=ddp", "model.n_layer=1", "model.n_embd=32", "task=text",
                                      f"task.data.path={corpus}", "task.tokenizer=char", f"task.cache_dir={cache}",
                                      "task.seq_len=16", "model.max_seq_len=16", "train.steps=1",
                                      f"hydra.run.dir={tmp_path / 'run'}"]), tmp_path, ranks=2)
    assert zero.returncode == one.returncode == 2, (zero.stderr[-2000:], one.stderr[-2000:])
    assert zero.stderr.startswith("error: cannot write") and "No space left on device" in zero.stderr
    assert zero.stderr.count("\n") == 1 and one.stderr.strip() == ""
