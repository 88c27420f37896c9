"""Sweeps and their records: run.json, the summary table, loss plots."""

import csv
import json
import subprocess
import sys

import pytest

from conftest import run_txtrain
from txtrain import plots, summary

SWEEP = ["-m", "optim.lr=1e-3,3e-3", "model.n_layer=1,2", "train.steps=10", "train.eval_every=5",
         "task.n_eval=50", "train.save_every=0", "plot=true"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    result = run_txtrain(*SWEEP, f"hydra.sweep.dir={root / 'sweep'}", cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "sweep"


def test_a_sweep_runs_every_combination_in_its_own_run_dir(sweep_dir):
    runs = summary.find_runs(sweep_dir)
    assert [run.name for run in runs] == ["0", "1", "2", "3"]
    combos = {tuple(o for o in overrides if o.startswith(("optim.lr", "model.n_layer")))
              for overrides in runs.values()}
    assert combos == {(f"optim.lr={lr}", f"model.n_layer={n}") for lr in ("0.001", "0.003") for n in (1, 2)}


def test_run_json_records_what_produced_the_run_and_its_result(sweep_dir):
    info = json.loads((sweep_dir / "2" / "run.json").read_text())
    assert info["command"][1:3] == ["-m", "optim.lr=1e-3,3e-3"]
    assert info["world_size"] == 1 and info["device"].startswith("cpu")
    assert info["torch"] and info["python"] and info["host"]
    assert info["git_commit"] is None or len(info["git_commit"]) >= 40  # None outside a checkout
    metrics = summary.read_jsonl(sweep_dir / "2" / "metrics.jsonl")
    assert info["result"]["step"] == 10 and info["result"]["loss"] == metrics[-1]["loss"]
    assert info["result"]["tokens_per_s"] > 0 and info["result"]["seconds"] > 0


def test_the_summary_table_matches_each_run_files(sweep_dir):
    result = run_txtrain_summary(sweep_dir)
    assert result.returncode == 0, result.stderr
    with (sweep_dir / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["run_dir"] for row in rows] == ["0", "1", "2", "3"]
    assert list(rows[0])[:2] == ["optim.lr", "model.n_layer"]  # only what varies
    for row in rows:
        run_dir = sweep_dir / row["run_dir"]
        overrides = (run_dir / ".hydra" / "overrides.yaml").read_text()
        assert f"optim.lr={row['optim.lr']}" in overrides
        assert f"model.n_layer={row['model.n_layer']}" in overrides
        assert float(row["final_loss"]) == summary.read_jsonl(run_dir / "metrics.jsonl")[-1]["loss"]
        evals = summary.read_jsonl(run_dir / "eval.jsonl")
        assert float(row["best_exact_match"]) == max(e["exact_match"] for e in evals)
        info = json.loads((run_dir / "run.json").read_text())["result"]
        assert float(row["tokens_per_s"]) == pytest.approx(info["tokens_per_s"])
        assert float(row["seconds"]) == pytest.approx(info["seconds"])
    markdown = (sweep_dir / "summary.md").read_text()
    assert markdown == result.stdout and markdown.count("\n") == 6


def run_txtrain_summary(folder):
    return subprocess.run([sys.executable, "-m", "txtrain.summary", str(folder)],
                          capture_output=True, text=True, timeout=60)


def test_summary_of_a_folder_without_runs_is_a_one_line_error(tmp_path):
    result = run_txtrain_summary(tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: no runs")


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_run_writes_loss_png_and_a_sweep_gets_an_overlay(sweep_dir):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    assert all(is_png(sweep_dir / str(i) / "loss.png") for i in range(4))
    overlay = plots.plot_sweep(sweep_dir)
    assert overlay == sweep_dir / "loss.png" and is_png(overlay)
    height, width, _ = matplotlib.image.imread(overlay).shape
    assert width > height > 300


def test_plot_without_matplotlib_says_how_to_get_it(sweep_dir, monkeypatch, capsys):
    for module in ("matplotlib", "matplotlib.figure"):  # as if it were not installed
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(SystemExit) as stopped:
        plots.main([str(sweep_dir / "0")])
    assert stopped.value.code == 2
    assert "pip install 'txtrain[plot]'" in capsys.readouterr().err


@pytest.mark.parametrize("nodelist,first", [("gpu[07-09,12],cpu01", "gpu07"), ("node01", "node01"),
                                            ("a[3],b", "a3"), ("n[010-011]", "n010")])
def test_the_rendezvous_host_is_the_first_node_of_a_slurm_node_list(nodelist, first):
    from txtrain.distributed import first_host

    assert first_host(nodelist) == first


def test_tensorboard_logger_writes_the_logged_scalars_and_the_config(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run_dir = tmp_path / "run"
    result = run_txtrain("logger=tensorboard", "train.steps=6", "train.log_every=2",
                         "train.eval_every=3", "task.n_eval=50", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    board = event_accumulator.EventAccumulator(str(run_dir / "tensorboard"),
                                               size_guidance={event_accumulator.TENSORS: 0})
    board.Reload()
    scalars = board.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/exact_match",
            "memory/rank0_peak_bytes"} <= set(scalars)
    logged = {r["step"]: r["loss"] for r in summary.read_jsonl(run_dir / "metrics.jsonl")}
    written = {event.step: event.value for event in board.Scalars("train/loss")}
    assert written.keys() == logged.keys() == {2, 4, 6}
    assert all(written[s] == pytest.approx(logged[s], rel=1e-6) for s in logged)  # float32 in the file
    assert [e.step for e in board.Scalars("eval/exact_match")] == [3, 6]
    config_text = board.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "n_layer:" in config_text and "seed:" in config_text
    assert (run_dir / "metrics.jsonl").is_file()  # JSONL stays on


def test_a_sweep_through_submitit_local_launcher_completes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    # One job: each is a fresh process (seconds of imports), and a sweep's jobs each getting a
    # run dir of their own is the basic launcher's test above; here, that this launcher runs them.
    result = run_txtrain("-m", "hydra/launcher=local", "optim.lr=3e-3", "train.steps=4",
                         "train.eval_every=2", "task.n_eval=50", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    [sweep_dir] = tmp_path.glob("multirun/*/*")  # the job agrees with the launcher on its name
    runs = summary.find_runs(sweep_dir)
    assert [run.name for run in runs] == ["0"]
    for run_dir in runs:
        assert json.loads((run_dir / "run.json").read_text())["result"]["step"] == 4
    assert (sweep_dir / ".submitit").is_dir()
