"""The command line: a run writes its run dir and resumes from it (mistakes: test_bad_input.py)."""

import json
from pathlib import Path

import pytest
import yaml
from hydra._internal.hydra import Hydra

from conftest import call_txtrain, run_txtrain

SHORT = ["train.steps=4", "train.log_every=2", "train.eval_every=2", "train.save_every=2",
         "task.n_eval=50", "model.n_layer=1", "model.n_embd=32"]


def test_a_run_writes_its_run_dir_and_resumes_from_it(tmp_path):
    run_dir = tmp_path / "run"
    result = run_txtrain(*SHORT, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= metrics[0].keys()
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4] and "exact_match" in evals[0]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert (run_dir / "checkpoints" / "step_000002" / "meta.pt").is_file()
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: step 4") and "exact_match" in summary
    assert "parameters" in result.stdout

    # Asking for more steps in the same run dir continues from step 4 (resume=auto).
    more = run_txtrain(*SHORT, "train.steps=6", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert "resumed from" in more.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]

    # A different model cannot resume from these weights: a one-line error.
    other = run_txtrain(*SHORT, "model.n_embd=64", "train.steps=8", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert other.returncode == 2 and other.stderr.startswith("error: checkpoint")
    assert "n_embd 32 -> 64" in other.stderr


def test_help_lists_the_config_groups(tmp_path):
    result = run_txtrain("--help", cwd=tmp_path)
    assert result.returncode == 0
    groups = result.stdout.split("Config groups")[1].split("\n\n")[0]
    for group in ("model", "task", "parallel", "precision", "optim", "schedule"):
        assert f"\n{group}: " in groups
    assert "schema" not in groups  # the typed schemas the config files build on are not choices


def test_a_command_composes_its_config_once(monkeypatch):
    """Hydra would compose the config a second time, only to read ``hydra.mode``, which no
    config of the package sets: a fifth of a second of every start."""
    composes = []
    compose = Hydra.compose_config
    monkeypatch.setattr(Hydra, "compose_config", lambda *a, **k: composes.append(1) or compose(*a, **k))
    assert call_txtrain("task=copy", "plan=true").status == 0
    assert len(composes) == 1


def test_no_config_of_the_package_sets_the_run_mode():
    """What lets a command skip Hydra's reading of ``hydra.mode`` (txtrain.cli)."""
    def paths(node, path=()):
        if isinstance(node, dict):
            for key, value in node.items():
                yield (*path, key)
                yield from paths(value, (*path, key))

    configs = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(configs.rglob("*.yaml"))
    assert len(files) > 30
    for file in files:
        assert not any(path[-2:] == ("hydra", "mode") for path in paths(yaml.safe_load(file.read_text()))), file


@pytest.mark.parametrize("where", ["a config of the user's", "the command line"])
def test_a_run_mode_that_a_users_config_or_the_command_line_sets_is_followed(tmp_path, where):
    mine = tmp_path / "myconf" / "experiment" / "sweep.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("# @package _global_\nhydra:\n  mode: MULTIRUN\n")
    sets_it = (["--config-dir", str(tmp_path / "myconf"), "experiment=sweep"] if where == "a config of the user's"
               else ["hydra.mode=MULTIRUN"])
    done = call_txtrain(*sets_it, "model.n_layer=1", "train.steps=1", "train.eval_every=0",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.status == 0, done.stderr
    assert (tmp_path / "sweep" / "0" / "metrics.jsonl").is_file() and not (tmp_path / "run").exists()
