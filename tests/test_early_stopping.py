"""Early stopping (``train.patience``): the run stops at the right evaluation, keeps its best
checkpoint whatever ``train.keep_last`` deletes, continues the count across a resume, and says
so in its log, its run.json, ``txtrain-sample --best`` and ``txtrain-summary``."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import call_txtrain, losses, run_txtrain
from txtrain.checkpoint import BEST_POINTER, Checkpoints
from txtrain.early_stop import EarlyStopping
from txtrain.sample import main as sample
from txtrain.summary import summary_rows

# train.min_delta=1: exact match, a fraction, can never improve by more than 1, so the first
# evaluation (step 2) stays the best and patience 2 runs out at the third (step 6).
PATIENT = ["model.n_layer=1", "model.n_embd=32", "task.n_eval=50", "task.max_len=6", "train.batch_size=8",
           "train.log_every=1", "train.eval_every=2", "train.save_every=1", "train.keep_last=1",
           "schedule=constant", "train.patience=2", "train.min_delta=1"]
STOP_LINE = ("early stop at step 6: exact_match has not improved by more than 1 for 2 evaluations; "
             "best {best:.4g} at step 2")


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def eval_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run of up to 40 steps that stops early at step 6, in a sweep folder of its own."""
    sweep = tmp_path_factory.mktemp("sweep")
    done = run_txtrain(*PATIENT, "train.steps=40", f"hydra.run.dir={sweep / '0'}", cwd=sweep)
    return sweep / "0", done


# --- the rule -----------------------------------------------------------------------------------
def test_patience_counts_evaluations_that_do_not_improve_by_more_than_min_delta():
    up = EarlyStopping(("exact_match", "max"), patience=2, min_delta=0.1)
    assert [up.update(step, {"exact_match": value}) for step, value in
            [(1, 0.5), (2, 0.55), (3, 0.61), (4, 0.6)]] == [True, False, True, False]
    assert (up.best, up.best_step, up.should_stop) == (0.61, 3, False)
    assert up.wants_checkpoint(3) and not up.wants_checkpoint(4)
    assert not up.update(5, {"exact_match": math.nan}) and up.should_stop and up.wants_checkpoint(5)

    down = EarlyStopping(("val_loss", "min"), patience=1)
    assert not down.update(1, {"val_loss": math.inf}) and down.should_stop and down.best is None
    assert down.describe_stop(1).endswith("for 1 evaluations (it was never finite)")

    resumed = EarlyStopping(("exact_match", "max"), patience=2, min_delta=0.1)
    resumed.load_state_dict(up.state_dict())
    assert resumed.state_dict() == up.state_dict() and resumed.should_stop
    other = EarlyStopping(("val_loss", "min"), patience=2)
    other.load_state_dict(up.state_dict())  # another metric's count does not carry over
    assert other.best is None and not other.should_stop

    off = EarlyStopping(("exact_match", "max"), patience=None)
    assert not off.update(1, {"exact_match": 1.0}) and not off.should_stop and off.state_dict() == {}


def test_retention_spares_the_checkpoint_best_names(tmp_path):
    checkpoints = Checkpoints(tmp_path / "checkpoints", keep_last=1)
    for step, best in [(1, 1), (2, 1), (3, 3), (4, 3)]:
        checkpoints.save(step, {"w": torch.full((2,), float(step))}, {"step": step}, best_step=best)
        assert checkpoints.best().name == f"step_{best:06d}"
    assert [path.name for path in checkpoints.saved()] == ["step_000003", "step_000004"]
    assert (checkpoints.directory / BEST_POINTER).read_text() == "step_000003\n"


# --- a run --------------------------------------------------------------------------------------
def test_a_run_stops_when_patience_runs_out_and_says_why(stopped):
    run_dir, done = stopped
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("done: step 6")
    assert eval_steps(run_dir) == [2, 4, 6]
    best = json.loads((run_dir / "eval.jsonl").read_text().splitlines()[0])["exact_match"]
    assert STOP_LINE.format(best=best) in done.stdout
    info = run_json(run_dir)
    assert (info["stopped_early"], info["main_metric"], info["best_step"], info["best_metric"]) == (
        True, "exact_match", 2, best)
    # keep_last=1 left the newest checkpoint, and the best one
    checkpoints = Checkpoints(run_dir / "checkpoints")
    assert [path.name for path in checkpoints.saved()] == ["step_000002", "step_000006"]
    assert checkpoints.best().name == "step_000002"

    # The same command again: nothing to train, run.json as it was
    again = run_txtrain(*PATIENT, "train.steps=40", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert again.returncode == 0 and "nothing to train: the run ran out of train.patience at step 6" in again.stdout
    assert run_json(run_dir)["result"] == info["result"]


def test_sample_best_loads_the_best_checkpoint(stopped, capsys):
    run_dir, _ = stopped
    for args, step in [(["--best"], 2), ([], 6)]:
        sample([str(run_dir), "--prompt", "3 4", "--max-new-tokens", "2", "--temperature", "0", *args])
        assert capsys.readouterr().err == f"# {run_dir / 'checkpoints' / f'step_{step:06d}'} (step {step})\n"
    status = None
    try:  # a run without early stopping has no best checkpoint: one line
        sample([str(run_dir / "nowhere"), "--best"])
    except SystemExit as leaving:
        status = leaving.code
    err = capsys.readouterr().err
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1 and "train.patience" in err


def test_summary_shows_the_best_step(stopped):
    run_dir, _ = stopped
    [row] = summary_rows(run_dir.parent)
    info = run_json(run_dir)
    assert (row["best_exact_match"], row["best_at_step"], row["stopped_early"]) == (info["best_metric"], 2, True)


def test_a_resume_continues_the_count(stopped, tmp_path):
    straight, _ = stopped
    run_dir = tmp_path / "resumed"
    first = run_txtrain(*PATIENT, "train.steps=4", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    info = run_json(run_dir)  # it ran to its end with one evaluation of patience left
    assert (info["stopped_early"], info["best_step"]) == (False, 2) and "early stop" not in first.stdout
    more = run_txtrain(*PATIENT, "train.steps=40", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    # a count started afresh would have taken step 6 as its best and stopped at step 10
    assert more.stdout.strip().splitlines()[-1].startswith("done: step 6")
    assert eval_steps(run_dir) == [2, 4, 6] and losses(run_dir) == losses(straight)
    for key in ("stopped_early", "best_step", "best_metric"):
        assert run_json(run_dir)[key] == run_json(straight)[key], key


@pytest.mark.parametrize("overrides, fragment", [
    (["train.patience=2", "train.eval_every=0"], "train.patience=2 counts evaluations"),
    (["train.patience=-1"], "train.patience must not be negative"),
    (["train.min_delta=-0.5"], "train.min_delta must not be negative"),
])
def test_impossible_early_stopping_settings_are_one_line(tmp_path, overrides, fragment):
    outcome = call_txtrain(*overrides, f"hydra.run.dir={tmp_path / 'run'}")
    lines = outcome.stderr.strip().splitlines()
    assert outcome.status == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert fragment in lines[0] and not (tmp_path / "run").exists()
