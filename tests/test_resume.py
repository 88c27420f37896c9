"""What a resume takes from the checkpoint (weights, optimizer state, counters, each rank's
random stream) and what from the run that resumes it (the optimizer's settings); and starting
over in a run dir without a trace of the old run."""

import logging
import random
from pathlib import Path

import pytest
import torch

from conftest import call_txtrain, make_config
from nonfinite import nan_loss_at
from txtrain import train as train_module
from txtrain.checkpoint import load_state_keys
from txtrain.config import ScheduleConfig, ScheduleName, TrainingStopped
from txtrain.optim import length_changes_past_lrs
from txtrain.rng import capture_rng, restore_rng
from txtrain.train import Trainer

SMALL = ["model.n_layer=1", "model.n_embd=32", "task.n_eval=50", "task.max_len=6", "train.batch_size=8",
         "train.log_every=1", "train.eval_every=0", "train.save_every=0"]


def train(run_dir: Path, *overrides: str) -> Trainer:
    trainer = Trainer(make_config(*SMALL, *overrides), run_dir)
    trainer.fit()
    return trainer


# --- the optimizer ------------------------------------------------------------------------------
def test_a_checkpoint_named_by_path_resumes_under_this_runs_optimizer_settings(tmp_path):
    train(tmp_path / "first", "train.steps=2", "optim.weight_decay=0", "optim.beta2=0.98")
    trainer = Trainer(make_config(*SMALL, "train.steps=3", f"resume={tmp_path / 'first'}",
                                  "optim.weight_decay=0.5", "optim.beta1=0.8", "optim.beta2=0.9",
                                  "optim.eps=1e-6"), tmp_path / "next")
    matrices, biases_and_norms = trainer.optimizer.param_groups
    assert matrices["weight_decay"] == 0.5 and biases_and_norms["weight_decay"] == 0.0
    for group in (matrices, biases_and_norms):
        assert tuple(group["betas"]) == (0.8, 0.9) and group["eps"] == 1e-6
    # ... while the moments are the checkpoint's
    assert {state["step"].item() for state in trainer.optimizer.state.values()} == {2}
    # which holds them and nothing of the param groups' settings (a resume never reads those)
    saved = {key.split(".")[1] for key in load_state_keys(tmp_path / "first" / "checkpoints" / "step_000002")
             if key.startswith("optimizer.")}
    assert saved == {"state"}


def test_a_checkpoint_of_another_optimizer_gives_its_weights_only_with_a_warning(tmp_path):
    adamw = train(tmp_path / "adamw", "train.steps=2")
    sgd = Trainer(make_config(*SMALL, "train.steps=3", "optim=sgd", "optim.momentum=0.5",
                              f"resume={tmp_path / 'adamw'}"), tmp_path / "in-process")
    assert isinstance(sgd.optimizer, torch.optim.SGD) and not sgd.optimizer.state
    assert all(group["momentum"] == 0.5 for group in sgd.optimizer.param_groups)
    for name, weight in adamw.model.state_dict().items():
        assert torch.equal(sgd.model.state_dict()[name], weight), name
    assert any("optim=adamw, this run uses optim=sgd: loading the weights only" in line
               for line in sgd.resume_warnings)
    # The same optimizer, but the state it needs was never saved
    train(tmp_path / "no-momentum", "train.steps=1", "optim=sgd", "optim.momentum=0")
    momentum = Trainer(make_config(*SMALL, "train.steps=2", "optim=sgd", f"resume={tmp_path / 'no-momentum'}"),
                       tmp_path / "momentum")
    assert any("holds no momentum_buffer" in line and "weights only" in line for line in momentum.resume_warnings)

    done = call_txtrain(*SMALL, "train.steps=3", "optim=sgd", f"resume={tmp_path / 'adamw'}",
                        f"hydra.run.dir={tmp_path / 'sgd'}")
    assert done.status == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("done: step 3")
    log = (tmp_path / "sgd" / "txtrain.log").read_text()
    assert "warning: " in log and "weights only" in log and "resumed from" in log


# --- random streams -----------------------------------------------------------------------------
def pretend_rank(monkeypatch, rank: int, world_size: int) -> None:
    """The next Trainer believes it is ``rank`` of ``world_size`` (enough to build and resume)."""
    build = train_module.build_strategy

    def build_as_rank(*args, **kwargs):
        strategy = build(*args, **kwargs)
        strategy.rank, strategy.world_size = rank, world_size
        strategy.gather = lambda mine: [mine]  # no other process to hear from
        return strategy

    monkeypatch.setattr(train_module, "build_strategy", build_as_rank)


def dropout_draws(run_dir: Path, monkeypatch, rank: int, world_size: int) -> torch.Tensor:
    with monkeypatch.context() as patch:
        pretend_rank(patch, rank, world_size)
        Trainer(make_config(*SMALL, "train.steps=3"), run_dir)
    return torch.rand(8)


def test_a_resume_under_more_processes_gives_every_rank_its_own_random_stream(tmp_path, monkeypatch):
    train(tmp_path, "train.steps=2")  # one process: one saved stream
    continued = torch.rand(8)  # what the stream of rank 0 draws next
    saved = torch.load(tmp_path / "checkpoints" / "step_000002" / "meta.pt", weights_only=True)["rng"]
    restore_rng(saved[0], [torch.device("cpu")])
    assert torch.equal(torch.rand(8), continued)  # (the saved state is the one after training)

    rank0 = dropout_draws(tmp_path, monkeypatch, rank=0, world_size=2)
    rank1 = dropout_draws(tmp_path, monkeypatch, rank=1, world_size=2)
    assert torch.equal(rank0, continued)  # the saved stream, where there is one
    assert not torch.equal(rank1, rank0)  # else one of its own ...
    assert torch.equal(dropout_draws(tmp_path, monkeypatch, rank=1, world_size=2), rank1)  # ... reproducibly


# --- counters -----------------------------------------------------------------------------------
def test_nonfinite_steps_in_a_row_are_counted_across_a_resume(tmp_path):
    def train_with_nan_at_3_and_4(run_dir: Path, steps: int) -> None:
        nan_loss_at(Trainer(make_config(*SMALL, f"train.steps={steps}", "train.skip_nonfinite=1"), run_dir),
                    [3, 4]).fit()

    with pytest.raises(TrainingStopped, match=r"step 4: .*\(2 steps in a row\)"):
        train_with_nan_at_3_and_4(tmp_path / "straight", 5)
    train_with_nan_at_3_and_4(tmp_path / "resumed", 3)  # ends (and saves) on a skipped step
    with pytest.raises(TrainingStopped, match=r"step 4: .*\(2 steps in a row\)"):
        train_with_nan_at_3_and_4(tmp_path / "resumed", 5)


# --- CUDA's random state, faked on a CPU --------------------------------------------------------
class FakeCuda:
    """``n`` visible GPUs, each with its own RNG state; a device that is not there raises as
    torch.cuda does."""

    def __init__(self, monkeypatch, n: int, current: int = 0):
        self.n, self.current = n, current
        self.states = {i: torch.full((16,), i, dtype=torch.uint8) for i in range(n)}
        fakes = {"is_available": lambda: True, "device_count": lambda: n, "current_device": lambda: current,
                 "get_rng_state": self.get_rng_state, "set_rng_state": self.set_rng_state}
        for module in (torch.cuda, torch.cuda.random):  # get/set_rng_state_all call the module's own
            for name, fake in fakes.items():
                monkeypatch.setattr(module, name, fake, raising=False)

    def index(self, device) -> int:
        index = device if isinstance(device, int) else torch.device(device).index
        index = self.current if index is None else index
        if index >= self.n:
            raise IndexError("tuple index out of range")
        return index

    def get_rng_state(self, device="cuda") -> torch.Tensor:
        return self.states[self.index(device)].clone()

    def set_rng_state(self, state: torch.Tensor, device="cuda") -> None:
        self.states[self.index(device)] = state.clone()


def test_cuda_random_state_is_the_ranks_own_device_and_restores_on_fewer_gpus(monkeypatch):
    eight = FakeCuda(monkeypatch, n=8, current=5)
    state = capture_rng([torch.device("cuda", 5)])  # rank 5 of a job on 8 GPUs
    assert torch.equal(state["cuda"], eight.states[5])
    one = FakeCuda(monkeypatch, n=1)  # resumed where one GPU is visible
    restore_rng(state, [torch.device("cuda")])
    assert torch.equal(one.states[0], eight.states[5])


def test_a_checkpoint_holding_every_gpus_random_state_restores_on_fewer_gpus(monkeypatch):
    one = FakeCuda(monkeypatch, n=1)
    every_gpu = [torch.full((16,), 10 + i, dtype=torch.uint8) for i in range(8)]  # as saved before
    restore_rng({"python": random.getstate(), "torch": torch.get_rng_state(), "cuda": every_gpu},
                [torch.device("cuda")])
    assert torch.equal(one.states[0], every_gpu[0])


def test_data_parallel_keeps_every_gpus_random_stream_and_gives_each_its_own(monkeypatch):
    """parallel=dp draws each replica's dropout from its own GPU's generator: a checkpoint keeps
    all of them, and at the start each GPU gets a stream of its own."""
    from txtrain.parallel.dp import DP
    from txtrain.rng import seed_each_gpu

    before = FakeCuda(monkeypatch, n=2)
    strategy = DP(make_config("parallel=dp").parallel, "cuda", seed=7)
    assert strategy.rng_devices == [torch.device("cuda", 0), torch.device("cuda", 1)]
    state = capture_rng(strategy.rng_devices)
    after = FakeCuda(monkeypatch, n=2)
    after.states = {i: torch.zeros(16, dtype=torch.uint8) for i in range(2)}
    restore_rng(state, strategy.rng_devices)
    assert all(torch.equal(after.states[i], before.states[i]) for i in range(2))

    generators = (torch.Generator().manual_seed(7), torch.Generator().manual_seed(7))  # as seeded alike
    monkeypatch.setattr(torch.cuda, "default_generators", generators)
    seed_each_gpu(7, 2)
    assert generators[0].initial_seed() == 7 and generators[1].initial_seed() not in (7, 8)


# --- starting over ------------------------------------------------------------------------------
def test_starting_over_leaves_nothing_of_the_old_run(tmp_path):
    train(tmp_path, "train.steps=2")
    for leftover in ("loss.png", "samples.txt", "tensorboard/events.out.tfevents.1"):
        (tmp_path / leftover).parent.mkdir(exist_ok=True)
        (tmp_path / leftover).write_text("old")
    log_file = tmp_path / "txtrain.log"
    log_file.write_text("a line of the old run\n")
    handler = logging.FileHandler(log_file, mode="a")  # as Hydra's, maybe open already
    logger = logging.getLogger("txtrain")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        trainer = Trainer(make_config(*SMALL, "train.steps=1", "resume=never", "overwrite=true"), tmp_path)
        left = sorted(p.name for p in tmp_path.iterdir() if p.stat().st_size or p.is_dir())
        assert left == [], left  # the log file is still there, empty
        trainer.fit()
    finally:
        logger.removeHandler(handler)
        handler.close()
        logger.setLevel(level)
    lines = log_file.read_text().splitlines()
    assert lines and lines[0].startswith("model:") and "a line of the old run" not in lines


# --- the schedule -------------------------------------------------------------------------------
def test_extending_a_run_warns_when_its_schedule_depends_on_the_length(tmp_path, caplog):
    train(tmp_path, "train.steps=4", "schedule.warmup_steps=1")
    with caplog.at_level(logging.INFO, logger="txtrain"):
        train(tmp_path, "train.steps=8", "schedule.warmup_steps=1")
    [warning] = [line for line in caplog.messages if line.startswith("warning") and "train.steps" in line]
    assert "train.steps 4 -> 8 under schedule=cosine" in warning
    assert "lr 0.0002 at step 4" in warning and "at step 5" in warning  # the learning rate before and after


@pytest.mark.parametrize("schedule,steps_done,depends", [
    ("cosine", 4, True), ("wsd", 4, True),
    ("cosine", 2, False),  # still warming up: the same learning rates either way
    ("wsd", 2, False),  # not decaying yet
    ("constant", 4, False), ("noam", 4, False)])
def test_which_schedules_depend_on_the_runs_length(schedule, steps_done, depends):
    cfg = ScheduleConfig(name=ScheduleName(schedule), warmup_steps=2)
    assert length_changes_past_lrs(cfg, steps_done, planned=4, now=8) == depends
