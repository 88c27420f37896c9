"""Each script in scripts/ runs as a user runs it, with its smallest arguments, and prints what
it promises. (bench.py and gpu_check.py have tests of their own.)"""

import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import forked

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
WORDS = "the quick brown fox jumps over the lazy dog while socrates asks what justice is. "
TINY_MODEL = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32"]


def smallest_runs(folder: Path) -> dict[str, list[str]]:
    """Each script's arguments for its smallest run in ``folder`` (its working directory),
    with the input files they name."""
    corpus = folder / "scaling" / "corpus.txt"
    corpus.parent.mkdir()
    corpus.write_text(WORDS * 200)
    tokens = folder / "reference" / "tokens.npy"
    tokens.parent.mkdir()
    np.save(tokens, np.tile(np.arange(10, dtype=np.uint16), 100))
    return {
        "parity": ["--steps", "2", "--strategies", "pipeline 1f1b", "--extra", "device=cpu",
                   "model.n_embd=32", "model.n_head=2", "task.max_len=4"],
        "dropout": ["--data", str(corpus), "--chars", "3000", "--steps", "4", "--dropouts", "0.0", "0.5",
                    "--out", "out", "task.tokenizer=bytes", "task.seq_len=16", "model.max_seq_len=16",
                    "train.eval_every=2", *TINY_MODEL],
        "positions": ["--train-len", "2", "--steps", "2", "--schemes", "rope", "--out", "out"],
        "scaling": ["--steps", "1", "--warmup", "1", "--tables", "seq_len", "--seq-lens", "16",
                    "--impls", "sdpa", "--out", "out", "task=text", f"task.data.path={corpus}",
                    "task.tokenizer=bytes", f"task.cache_dir={corpus.parent / 'cache'}", *TINY_MODEL],
        "reference": ["--tokens", str(tokens), "--vocab-size", "10", "--vocab-multiple", "8",
                      "--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--seq-len", "8",
                      "--batch-size", "4", "--steps", "30", "--lr", "1e-2", "--warmup-steps", "1",
                      "--device", "cpu", "--json", "out.json"],
        "data_bench": ["--corpus", str(corpus.parent), "--mb", "0.05", "--workers", "1", "2",
                       "--tokenizer", "bytes", "--train-tokens", "20000", "--steps", "2", "--out", "out",
                       *TINY_MODEL, "task.seq_len=16", "train.batch_size=4"],
        "step_profile": ["--no-defaults", "--steps", "1", "--rows", "5", *TINY_MODEL, "task.max_len=4",
                         "train.batch_size=8"],
    }


@pytest.fixture(scope="module")
def finished(request, tmp_path_factory) -> Callable[[str], tuple[str, Path]]:
    """A script's standard output and working directory, once it has ended. Each script runs
    as ``python script.py`` would, as ``__main__`` in a process of its own, forked with torch
    already imported (tests/forked.py); the scripts of the selected tests (test_<script>_...)
    start all at once, and on two cores they end in about half the time."""
    folder = tmp_path_factory.mktemp("scripts")
    runs = smallest_runs(folder)
    selected = [name for name in runs if any(item.name.startswith(f"test_{name}_")
                                             for item in request.session.items)]
    # One thread a process: on a busy machine, tiny ops on several threads wait for each other.
    # The scripts' own temporary folders (their run dirs, kept) go in the test's.
    (folder / "tmp").mkdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", TMPDIR=str(folder / "tmp"))
    processes = {}
    for name in selected:
        (folder / name).mkdir(exist_ok=True)
        processes[name] = forked.Forked(str(SCRIPTS / f"{name}.py"), runs[name], folder / name, env,
                                        threads=1)  # torch is imported: OMP_NUM_THREADS is too late

    def wait(name: str) -> tuple[str, Path]:
        done = processes[name].finish(timeout=300)
        assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-2000:]
        return done.stdout, folder / name

    yield wait
    for process in processes.values():  # those whose test failed before waiting
        if process.poll() is None:
            process.kill()
            process.wait()


def table_rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row, separator rows left out."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in text.splitlines() if line.startswith("|") and not line.startswith("|---")]


def test_data_bench_measures_prepare_and_training_on_synthetic_shards(finished):
    out, folder = finished("data_bench")
    prepare, training = json.loads((folder / "out" / "data_bench.json").read_text()).values()
    assert [row["workers"] for row in prepare] == [1, 2]
    assert all(row["mb_per_s"] > 0 for row in prepare)
    assert prepare[0]["output"] == prepare[1]["output"]  # the same bytes, whatever the workers
    assert training[0]["tokens"] == 20000 and training[0]["peak_resident_mb"] > 0
    assert 0 < training[0]["startup_s"] < 120
    assert len(table_rows(out)) == (1 + 2) + (1 + 1)  # two tables: a header and a row per run


def test_dropout_tabulates_each_dropouts_losses_and_where_val_loss_turned(finished):
    out, folder = finished("dropout")
    assert re.search(r"dropout 0\.5: train [\d.]+ val [\d.]+ gap -?[\d.]+, best val [\d.]+ at step [24]", out), out
    study = json.loads((folder / "out" / "dropout.json").read_text())
    assert study["steps"] == 4 and study["train_tokens"] + study["val_tokens"] == 3000  # bytes: a token a character
    assert [r["dropout"] for r in study["results"]] == [0.0, 0.5]
    for r in study["results"]:
        assert [e["step"] for e in r["evals"]] == [2, 4]
        assert r["gap"] == pytest.approx(r["val_loss"] - r["train_loss"])
        assert r["best_val_loss"] == min(e["val_loss"] for e in r["evals"])
        assert r["still_improving"] == (r["best_step"] == 4)
    rows = table_rows((folder / "out" / "dropout.md").read_text())
    assert rows[0][:4] == ["dropout", "train loss", "val loss", "gap (val - train)"] and len(rows) == 3
    assert rows[2][0] == "0.5" and rows[2][-1] in ("still improving", "step 2")
    assert (folder / "out" / "dropout.png").stat().st_size > 0


def test_parity_prints_how_close_a_strategy_comes_to_one_process(finished):
    out, _ = finished("parity")
    header, row = table_rows(out)
    assert header[0] == "strategy" and "2 steps" in header[2]
    assert row[:2] == ["pipeline 1f1b", "2"]
    loss_difference, weight_difference = float(row[2]), float(row[3])
    assert 0 <= loss_difference < 1e-3 and 0 <= weight_difference < 1e-3  # as tests/test_parallel


def test_positions_measures_every_length_for_each_architecture(finished):
    out, folder = finished("positions")
    assert re.search(r"gpt +rope +lengths 1\.\.2: [\d.]+ +3\.\.4: [\d.]+", out), out
    results = json.loads((folder / "out" / "positions.json").read_text())["results"]
    assert [(r["arch"], r["pos"]) for r in results] == [("gpt", "rope"), ("encoder_decoder", "rope")]
    for result in results:
        assert sorted(map(int, result["exact_match"])) == [1, 2, 3, 4]
        assert all(0 <= score <= 1 for score in result["exact_match"].values())
    rows = table_rows((folder / "out" / "positions.md").read_text())
    assert rows[0][:3] == ["model", "pos", "trained 1..2"] and len(rows) == 3
    assert (folder / "out" / "positions.png").stat().st_size > 0


def test_scaling_tabulates_speed_and_memory(finished):
    _, folder = finished("scaling")
    rows = json.loads((folder / "out" / "scaling.json").read_text())
    assert rows["size"] == rows["compile"] == []
    (row,) = rows["seq_len"]
    assert (row["seq_len"], row["impl"]) == (16, "sdpa")
    assert row["tokens_per_s"] > 0 and 0 < row["mfu"] < 2
    assert 0 < row["planned_gib"] < 4 and 0 < row["peak_gib"] < 4
    cells = table_rows((folder / "out" / "scaling.md").read_text())
    assert [cells[0][:3], cells[1][:2]] == [["seq len", "impl", "tokens/s"], ["16", "sdpa"]]
    assert (folder / "out" / "scaling.png").stat().st_size > 0


def test_reference_loop_learns_a_repeating_sequence(finished):
    out, folder = finished("reference")
    assert len(re.findall(r"^step \d+: loss [\d.]+, \d+ ms$", out, re.MULTILINE)) == 30
    result = json.loads((folder / "out.json").read_text())
    losses = result["losses"]
    assert losses[0] == pytest.approx(np.log(10), rel=0.2)  # a uniform guess at first
    assert losses[-1] < losses[0] / 2  # the next token is always determined
    assert len(result["step_seconds"]) == 30 and result["tokens_per_step"] == 32
    assert result["peak_memory_bytes"] > 2**20


def test_step_profile_splits_the_step_time_into_groups(finished):
    out, _ = finished("step_profile")
    assert "Self CPU" in out and "aten::" in out  # the profiler's table
    shares = dict(re.findall(r"(\w+) ([\d.]+)%", out.split("share of step time:")[1]))
    assert list(shares) == ["matmul", "attention", "loss", "optimizer", "zeroing", "copies", "other"]
    assert sum(map(float, shares.values())) == pytest.approx(100, abs=0.5)
    assert float(shares["matmul"]) > 0
