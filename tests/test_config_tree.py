"""The config tree: a group the user picks keeps its preset's values whatever the task, each
task alone still gets its tuned recipe, and the tree ships inside the installed package."""

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from conftest import call_txtrain, make_config
from txtrain.config import ModelConfig, OptimConfig, ScheduleConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TASKS = sorted(p.stem for p in (CONFIGS / "task").glob("*.yaml"))
NEEDS_DATA = {"text": ["task.data.path=corpus.txt"]}  # never read: only composed
TEXT_TASKS = ("socrates", "text")


def presets(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def preset(group: str, name: str, schema) -> dict:
    """A preset's values merged onto its schema's defaults, as plain values."""
    values = yaml.safe_load((CONFIGS / group / f"{name}.yaml").read_text())
    merged = OmegaConf.merge(OmegaConf.structured(schema), values)
    return yaml.safe_load(OmegaConf.to_yaml(merged))


def composed_by_the_cli(*overrides: str) -> dict:
    """What ``txtrain --cfg job ...`` prints, read back."""
    outcome = call_txtrain("--cfg", "job", *overrides)
    assert outcome.status == 0, outcome.stderr
    return yaml.safe_load(outcome.stdout)


def as_plain(node) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(node))


@pytest.mark.parametrize("task", TASKS)
def test_a_model_picked_on_the_command_line_keeps_its_preset_with_every_task(task):
    for model in presets("model"):
        if task in TEXT_TASKS and preset("model", model, ModelConfig)["arch"] == "encoder_decoder":
            continue  # refused: the encoder-decoder needs a source and a target
        cfg = make_config(f"task={task}", f"model={model}", *NEEDS_DATA.get(task, []))
        assert as_plain(cfg.model) == preset("model", model, ModelConfig), f"task={task} model={model}"


def test_the_printed_config_keeps_the_groups_picked_in_the_issues_examples():
    shown = composed_by_the_cli("task=fibonacci", "model=small")
    assert shown["model"] == preset("model", "small", ModelConfig)
    shown = composed_by_the_cli("task=copy", "optim=sgd")
    assert shown["optim"] == preset("optim", "sgd", OptimConfig)


@pytest.mark.parametrize("task", TASKS)
def test_a_schedule_or_another_optimizer_keeps_its_preset_with_every_task(task):
    data = NEEDS_DATA.get(task, [])
    for schedule in presets("schedule"):
        cfg = make_config(f"task={task}", f"schedule={schedule}", *data)
        assert as_plain(cfg.schedule) == preset("schedule", schedule, ScheduleConfig)
    tuned_for = {p.stem.split("_")[1] for p in (CONFIGS / "recipe").glob(f"{task}_*.yaml")}
    for optim in set(presets("optim")) - tuned_for:
        cfg = make_config(f"task={task}", f"optim={optim}", *data)
        assert as_plain(cfg.optim) == preset("optim", optim, OptimConfig), f"task={task} optim={optim}"


@pytest.mark.parametrize("task, steps, lr, n_embd", [("copy", 1000, 3e-3, 128), ("reverse", 700, 2e-3, 128),
                                                     ("fibonacci", 1500, 1e-3, 192)])
def test_a_task_alone_gets_its_recipe_and_the_command_line_still_wins(task, steps, lr, n_embd):
    cfg = make_config(f"task={task}")
    assert (cfg.train.steps, cfg.optim.lr, cfg.model.n_embd) == (steps, lr, n_embd)
    cfg = make_config(f"task={task}", "train.steps=5", "optim.lr=0.5")
    assert (cfg.train.steps, cfg.optim.lr) == (5, 0.5)


def test_a_config_dir_of_the_users_own_adds_an_experiment(tmp_path):
    (tmp_path / "myconf" / "experiment").mkdir(parents=True)
    (tmp_path / "myconf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /task: copy\nmodel:\n  n_layer: 3\n")
    shown = composed_by_the_cli("--config-dir", str(tmp_path / "myconf"), "experiment=mine")
    assert (shown["task"]["name"], shown["model"]["n_layer"]) == ("copy", 3)


def test_a_built_wheel_carries_the_config_tree_and_composes_outside_the_repository(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info next to the sources
    for folder in ("txtrain", "configs"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, source / file)
    # With setuptools at hand, build with it (fast, offline); else pip fetches it.
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation,
                            "--quiet", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("txtrain-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "txtrain/configs/train.yaml" in names and "txtrain/configs/task/copy.yaml" in names
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")  # what pip install puts in site-packages
    # Run from elsewhere, with only the wheel's copy of txtrain importable: the editable
    # install of this checkout is hidden by putting the wheel first on the path.
    script = ("import txtrain, sys; from txtrain.cli import compose_config; "
              "cfg = compose_config('task=fibonacci', 'model=small'); "
              "print(txtrain.__file__); print(cfg.task.name, cfg.model.n_embd, cfg.train.steps)")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    shown = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    where, composed = shown.stdout.splitlines()
    assert Path(where).is_relative_to(tmp_path / "site")
    assert composed == "fibonacci 256 1500"
