"""Hyperparameter search through hydra-optuna-sweeper: a run returns its objective to the
sweeper, the search picks the trial that did best, outlives a trial that diverged, and
``txtrain-summary`` reads its folder."""

import json
import math
from pathlib import Path

import pytest
import yaml

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
# optuna 2 imports its SQL storage, written for SQLAlchemy 1, which warns of SQLAlchemy 2.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:optuna")

from conftest import call_txtrain  # noqa: E402
from nonfinite import nan_loss_at  # noqa: E402
from txtrain import summary  # noqa: E402
from txtrain.train import Trainer  # noqa: E402

TINY = ["model.n_layer=1", "model.n_embd=32", "task.n_eval=50", "task.max_len=2", "train.batch_size=16",
        "train.steps=6", "train.eval_every=0", "train.save_every=0"]
SEARCH = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_jobs=1"]


def last_eval(run_dir: Path) -> dict:
    return json.loads((run_dir / "eval.jsonl").read_text().splitlines()[-1])


def results(sweep_dir: Path) -> dict:
    return yaml.safe_load((sweep_dir / summary.SEARCH_RESULTS).read_text())


def seeded_search(sweep_dir: Path):
    """Three trials of a log-uniform learning rate, each trained 6 steps and evaluated once."""
    return call_txtrain(*SEARCH, "hydra.sweeper.sampler.seed=0", "optim.lr=tag(log,interval(1e-4,1e-1))",
                        "hydra.sweeper.n_trials=3", *TINY, f"hydra.sweep.dir={sweep_dir}")


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("search") / "sweep"
    done = seeded_search(sweep_dir)
    assert done.status == 0, done.stderr
    assert "note:" not in done.stderr  # seeded: nothing to say
    return sweep_dir


def test_a_search_picks_the_trial_with_the_lowest_evaluation_loss(search):
    runs = summary.find_runs(search)
    assert [run.name for run in runs] == ["0", "1", "2"]
    lrs = {run: float(dict(o.split("=") for o in overrides)["optim.lr"]) for run, overrides in runs.items()}
    assert len(set(lrs.values())) == 3 and all(1e-4 <= lr <= 1e-1 for lr in lrs.values())
    losses = {run: last_eval(run)["eval_loss"] for run in runs}  # the default objective
    best = min(losses, key=losses.get)
    assert results(search)["best_params"] == {"optim.lr": lrs[best]}
    assert results(search)["best_value"] == losses[best]


def test_a_seeded_search_draws_the_same_trials_again(search, tmp_path):
    again = tmp_path / "sweep"
    assert seeded_search(again).status == 0
    assert summary.find_runs(again) == {again / run.name: overrides
                                        for run, overrides in summary.find_runs(search).items()}
    assert results(again) == results(search)


def test_the_summary_shows_each_trials_objective_and_the_best_trial(search, capsys):
    summary.main([str(search)])
    out = capsys.readouterr().out
    rows = summary.summary_rows(search)
    assert [row["run_dir"] for row in rows] == ["0", "1", "2"] and list(rows[0])[:2] == ["optim.lr", "objective"]
    assert all(row["objective"] == last_eval(search / row["run_dir"])["eval_loss"] for row in rows)
    best = min(rows, key=lambda row: row["objective"])
    assert out.endswith(f"\nbest trial: run {best['run_dir']}, optim.lr={summary.as_text(float(best['optim.lr']))}, "
                        f"objective {summary.as_text(best['objective'])}\n")
    assert (search / "summary.md").read_text() == out


def test_a_search_for_exact_match_maximizes_it_and_goes_on_past_a_diverged_trial(tmp_path, monkeypatch):
    build = Trainer.__init__

    def diverging_above_lr_1e_2(trainer, *args, **kwargs):
        build(trainer, *args, **kwargs)
        if trainer.cfg.optim.lr > 1e-2:
            nan_loss_at(trainer, {1})

    monkeypatch.setattr(Trainer, "__init__", diverging_above_lr_1e_2)
    sweep_dir = tmp_path / "sweep"
    # The grid sampler tries both values: the larger one diverges at its first step.
    done = call_txtrain(*SEARCH, "hydra/sweeper/sampler=grid", "optim.lr=choice(0.1,0.003)",
                        "objective=exact_match", "hydra.sweeper.direction=maximize", *TINY,
                        f"hydra.sweep.dir={sweep_dir}")
    assert done.status == 0, done.stderr
    assert "error: step 1: the loss is nan" in done.stderr
    assert "(this trial returns -inf, the worst, and the search goes on)\n" in done.stderr
    lrs = {run.name: overrides for run, overrides in summary.find_runs(sweep_dir).items()}
    diverged, trained = (sorted(lrs, key=lambda run: "optim.lr=0.1" not in lrs[run]))
    assert "result" not in json.loads((sweep_dir / diverged / "run.json").read_text())
    trained_eval = last_eval(sweep_dir / trained)
    # The diverged trial returned -inf (the worst when maximizing), not NaN: optuna keeps it as a
    # trial that ran, rather than one that failed.
    assert "Failed experiment" not in done.stdout + done.stderr
    assert results(sweep_dir) == {"name": "optuna", "best_params": {"optim.lr": 0.003},
                                  "best_value": trained_eval["exact_match"]}
    assert trained_eval["exact_match"] != trained_eval["eval_loss"]
    objectives = {row["run_dir"]: row["objective"] for row in summary.summary_rows(sweep_dir)}
    assert objectives == {diverged: None, trained: trained_eval["exact_match"]}


def test_a_search_that_would_optimize_the_wrong_way_is_refused_before_training(tmp_path):
    done = call_txtrain(*SEARCH, "optim.lr=tag(log,interval(1e-4,1e-1))", "hydra.sweeper.n_trials=2",
                        "objective=exact_match", *TINY, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert done.status == 2
    assert done.stderr.strip().splitlines()[-1] == (
        "error: objective=exact_match is better higher and the sweeper would minimize it: set "
        "hydra.sweeper.direction=maximize")
    assert done.stderr.startswith("note: the sampler has no seed, so this search cannot be repeated")
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # nothing trained, no log


def test_a_finite_objective_is_returned_as_it_is_and_a_non_finite_one_as_the_worst():
    from txtrain.objective import objective_value, returned

    result = {"exact_match": 0.5, "eval_loss": 1.25, "loss": None, "step": 6}
    assert objective_value(None, result) == 1.25 and objective_value("exact_match", result) == 0.5
    assert math.isnan(objective_value("loss", result))  # run.json's null
    assert returned(math.nan, "minimize") == math.inf and returned(math.nan, "maximize") == -math.inf
    assert math.isnan(returned(math.nan, None)) and returned(0.5, "maximize") == 0.5
