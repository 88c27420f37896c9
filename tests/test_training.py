"""The trainer learns, repeats itself, resumes exactly, and accumulates gradients exactly."""

import json
from pathlib import Path

import pytest
import torch

from conftest import interrupted_copy, losses, make_config
from txtrain.generate import greedy_exact_match
from txtrain.optim import build_optimizer, lr_factor
from txtrain.config import ScheduleConfig
from txtrain.train import Trainer

SMALL = ["model.n_layer=1", "model.n_embd=32", "task.n_eval=100", "task.max_len=6",
         "train.log_every=1", "train.eval_every=0", "train.save_every=0"]


def fit(run_dir: Path, *overrides: str) -> tuple[Trainer, dict]:
    trainer = Trainer(make_config(*overrides), run_dir)
    return trainer, trainer.fit()


@pytest.fixture(scope="module")
def trained_reverse(tmp_path_factory):
    """A short real run on reverse, shared by the tests that need a trained model."""
    run_dir = tmp_path_factory.mktemp("reverse")
    return fit(run_dir, "task=reverse", "task.max_len=6", "train.steps=200", "optim.lr=3e-3",
               "schedule.warmup_steps=20", "train.eval_every=0", "train.save_every=0")


@pytest.mark.slow
def test_reverse_learns_to_high_exact_match(trained_reverse):
    _, summary = trained_reverse
    assert summary["exact_match"] >= 0.9
    assert summary["loss"] < 0.1


@pytest.mark.slow
def test_teacher_forced_exact_match_equals_greedy_decoding(trained_reverse):
    trainer, summary = trained_reverse
    task = trainer.task
    answers = [task.answer(p) for p in task.held_out]
    trainer.model.eval()
    greedy = greedy_exact_match(trainer.model, task.held_out, answers)
    assert greedy == pytest.approx(summary["exact_match"], abs=0.002)


def test_overfitting_one_batch_drives_the_loss_to_zero(tmp_path):
    _, summary = fit(tmp_path, *SMALL, "model.n_embd=64", "debug.overfit_batch=true",
                     "train.batch_size=8", "train.steps=150", "optim.lr=1e-2",
                     "schedule=constant", "schedule.warmup_steps=10")
    assert summary["loss"] < 0.01


def test_label_smoothing_keeps_the_loss_off_zero(tmp_path):
    _, summary = fit(tmp_path, *SMALL, "model.n_embd=64", "debug.overfit_batch=true",
                     "train.batch_size=8", "train.steps=150", "optim.lr=1e-2",
                     "schedule=constant", "schedule.warmup_steps=10", "train.label_smoothing=0.2")
    assert summary["loss"] > 0.3  # the smoothed target's own entropy is a floor


def test_a_run_repeats_itself_for_the_same_seed(tmp_path):
    common = [*SMALL, "train.steps=5", "model.dropout=0.1"]
    fit(tmp_path / "a", *common)
    fit(tmp_path / "b", *common)
    fit(tmp_path / "c", *common, "seed=1")
    assert losses(tmp_path / "a") == losses(tmp_path / "b") != losses(tmp_path / "c")


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    # Dropout on, so the RNG state must come back too; accumulation on, so micro-batching does.
    common = [*SMALL, "train.steps=12", "train.save_every=6", "model.dropout=0.1",
              "train.batch_size=16", "train.micro_batch_size=8"]
    full = tmp_path / "full"
    fit(full, *common)

    # The same run, interrupted after the checkpoint at step 6: only that checkpoint survives.
    interrupted = interrupted_copy(full, tmp_path / "interrupted", saved_at=6, last=12)

    trainer, _ = fit(interrupted, *common)  # resume=auto finds step 6
    assert trainer.resumed_from.name == "step_000006"
    resumed = losses(interrupted)
    assert sorted(resumed) == list(range(7, 13))
    assert resumed == {step: loss for step, loss in losses(full).items() if step > 6}


def test_gradient_accumulation_gives_the_same_losses(tmp_path):
    # Variable-length sequences: the loss must be normalised by the global token count,
    # not averaged over micro-batches, for the two to agree.
    common = [*SMALL, "train.steps=6", "train.batch_size=16"]
    fit(tmp_path / "whole", *common)
    fit(tmp_path / "accumulated", *common, "train.micro_batch_size=4")
    whole, accumulated = losses(tmp_path / "whole"), losses(tmp_path / "accumulated")
    assert whole.keys() == accumulated.keys()
    for step in whole:
        assert accumulated[step] == pytest.approx(whole[step], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("pos", ["learned", "sinusoidal", "rope"])
def test_each_positional_scheme_trains(tmp_path, pos):
    _, summary = fit(tmp_path, *SMALL, f"model.pos={pos}", "task=copy", "model.n_embd=64",
                     "train.steps=200", "optim.lr=3e-3", "schedule.warmup_steps=10")
    first = losses(tmp_path)[1]
    assert summary["loss"] < 0.5 * first  # at step 200: 0.07, 0.38 and 0.29 of the first


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_each_optimizer_reduces_the_loss(tmp_path, optimizer):
    lr = "0.3" if optimizer == "sgd" else "3e-3"
    _, summary = fit(tmp_path, *SMALL, f"optim={optimizer}", f"optim.lr={lr}", "train.steps=40",
                     "debug.overfit_batch=true", "train.batch_size=8", "schedule=constant")
    assert summary["loss"] < 0.6 * losses(tmp_path)[1]


@pytest.mark.parametrize("optimizer", ["adamw", "adam"])
def test_adam_runs_fused_on_a_cpu(optimizer):
    model = torch.nn.Linear(4, 4)
    built = build_optimizer(model, make_config(f"optim={optimizer}").optim, torch.device("cpu"))
    assert [group["fused"] for group in built.param_groups] == [True, True]  # one kernel a step


def test_schedules():
    cosine = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cosine, 0, 100) == pytest.approx(0.1)
    assert lr_factor(cosine, 9, 100) == pytest.approx(1.0)  # the last warm-up update: the peak
    assert lr_factor(cosine, 10, 100) < 1.0  # the first decay update is below it
    assert lr_factor(cosine, 99, 100) == pytest.approx(0.1)  # the run's last update: the floor
    noam = ScheduleConfig(name="noam", warmup_steps=16)
    factors = [lr_factor(noam, s, 1000) for s in range(200)]
    assert max(factors) == pytest.approx(1.0) and factors.index(max(factors)) == 15
    assert factors[63] == pytest.approx(0.5)  # 1/sqrt(step) past warmup: step 64 = 4 x 16
    assert lr_factor(ScheduleConfig(name="constant", warmup_steps=0), 50, 100) == 1.0
    wsd = ScheduleConfig(name="wsd", warmup_steps=10, min_lr_ratio=0.0, decay_fraction=0.2)
    factors = [lr_factor(wsd, s, 110) for s in range(110)]  # 20 decay updates at the end
    assert factors[9] == factors[89] == 1.0 and factors[90] == pytest.approx(0.95)
    assert factors[109] == 0.0
    # Extending a run before its decay starts changes nothing that was already done.
    assert [lr_factor(wsd, s, 210) for s in range(90)] == factors[:90]


def test_only_rank_0_works_out_what_only_it_writes(tmp_path, monkeypatch):
    """The memory report (and the search for what fits, where a plan does not) and git's
    answers for run.json: every rank worked them out at start-up, and rank 0 alone wrote them."""
    import txtrain.train

    asked = []
    monkeypatch.setattr(txtrain.train.planner, "report", lambda *args: asked.append("report") or [])
    monkeypatch.setattr(txtrain.train, "run_identity", lambda *args: asked.append("identity") or {})
    trainer = Trainer(make_config(*SMALL, "train.steps=1"), tmp_path / "rank1")
    with monkeypatch.context() as patched:  # as the second of two ranks sees itself
        patched.setattr(type(trainer.strategy), "is_main", property(lambda strategy: False))
        trainer.fit()
    assert asked == []
    Trainer(make_config(*SMALL, "train.steps=1"), tmp_path / "rank0").fit()
    assert asked == ["report", "identity"]


def test_the_per_step_agreement_to_stop_counts_as_training_time(tmp_path, monkeypatch):
    """Under several ranks, agreeing whether to stop waits for the step's work on the GPU (an
    all-reduce read on the host); left out of the step's time, it made tokens/s too high."""
    import time

    from txtrain.stopping import StopRequests

    def agree_slowly(self, device):
        time.sleep(0.2)
        return False

    monkeypatch.setattr(StopRequests, "agreed", agree_slowly)
    Trainer(make_config(*SMALL, "train.steps=3", "train.log_every=1"), tmp_path / "run").fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["step_ms"] >= 200 for r in records[1:])  # each after a step's agreement
