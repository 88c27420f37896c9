"""Parallel strategies on several ranks (gloo, CPU): each one trains exactly like one process.

The reference is one process with parallel=none; every strategy runs the same 8 steps (same
seed, fp32, no dropout, same global batch, the full learning rate from step 2) and must
reproduce its per-step losses and its final weights. Checkpoints written under one layout
resume under another on the same trajectory.
"""

import json
from pathlib import Path

import pytest
import torch

from conftest import losses, make_config, run_ranks, run_txtrain
from txtrain.checkpoint import Checkpoints, load_model_weights
from txtrain.model import Transformer
from txtrain.resume import CheckpointMeta

STEPS = 8
SAVED_AT = STEPS // 2  # a checkpoint that other layouts resume from
# 4 blocks, so that a pipeline has 2 per rank (or 1 per stage, interleaved); untied embeddings
# (a pipeline's tied ones, held by its first and last stage, are test_pipeline_tied.py's); 13
# symbols padded to 15 rows, which FSDP splits unevenly (8 + 7).
RUN = [f"train.steps={STEPS}", "train.log_every=1", f"train.save_every={SAVED_AT}",
       f"train.eval_every={SAVED_AT}", "schedule.warmup_steps=2",
       "task.n_eval=100", "model.n_layer=4", "model.n_embd=64", "model.tie_embeddings=false",
       "model.vocab_multiple=5", "model.dropout=0", "precision=fp32", "progress=false",
       "plot=false", "train.batch_size=32"]
STRATEGIES = {  # name: (overrides, processes, relative tolerance)
    "ddp": (["parallel=ddp", "train.micro_batch_size=8"], 2, 1e-4),  # 2 micro-batches per rank
    "fsdp": (["parallel=fsdp", "train.micro_batch_size=8"], 2, 1e-4),
    "fsdp-keep-gathered": (["parallel=fsdp", "parallel.reshard_after_forward=false"], 2, 1e-4),
    "pipeline-gpipe": (["parallel=pipeline", "parallel.schedule=gpipe"], 2, 1e-3),
    "pipeline-1f1b": (["parallel=pipeline", "parallel.schedule=1f1b"], 2, 1e-3),
    "pipeline-interleaved": (["parallel=pipeline", "parallel.schedule=interleaved",
                              "parallel.stages_per_rank=2"], 2, 1e-3),
    "fsdp-hybrid": (["parallel=fsdp", "parallel.replicate=2"], 4, 1e-4),
}


ranks = run_ranks  # the ranks of one run, as torchrun starts them (forked: see conftest.py)


def evaluations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoints(run_dir / "checkpoints").latest()
    model = Transformer(make_config(*RUN).model, CheckpointMeta.load(checkpoint).vocab_size)
    load_model_weights(checkpoint, model)
    return model.state_dict()


def assert_same_losses(run_dir: Path, reference: dict[int, float], tolerance: float, steps):
    got = losses(run_dir)
    assert sorted(got) == list(steps)
    worst = max(abs(got[s] - reference[s]) / abs(reference[s]) for s in steps)
    assert worst <= tolerance, f"max relative loss difference {worst:.2e} > {tolerance}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("none") / "run"
    result = run_txtrain(*RUN, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def strategy_runs(tmp_path_factory):
    """Each strategy's run dir, trained once and shared by the tests below."""
    made = {}

    def run(name: str) -> Path:
        if name not in made:
            overrides, nproc, _ = STRATEGIES[name]
            run_dir = tmp_path_factory.mktemp(name) / "run"
            result = ranks(*overrides, *RUN, f"hydra.run.dir={run_dir}", nproc=nproc,
                           cwd=run_dir.parent)
            assert result.returncode == 0, result.stderr[-3000:]
            made[name] = run_dir
        return made[name]

    return run


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_strategy_reproduces_the_single_process_run(name, reference, strategy_runs):
    run_dir = strategy_runs(name)
    tolerance = STRATEGIES[name][2]
    assert_same_losses(run_dir, losses(reference), tolerance, range(1, STEPS + 1))
    evals, reference_evals = evaluations(run_dir), evaluations(reference)
    assert [e["step"] for e in evals] == [SAVED_AT, STEPS]
    for got, expected in zip(evals, reference_evals):
        assert got["exact_match"] == pytest.approx(expected["exact_match"], abs=0.011)
        assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=tolerance)
    # The weights as one vector. (Tensor by tensor, the key bias would stand out: its gradient
    # is zero but for rounding, softmax being blind to it, and Adam turns rounding into steps.)
    expected, got = final_weights(reference), final_weights(run_dir)
    expected_vector = torch.cat([value.flatten() for value in expected.values()])
    got_vector = torch.cat([got[key].flatten() for key in expected])
    difference = (got_vector - expected_vector).norm() / expected_vector.norm()
    assert difference <= tolerance, f"final weights differ by {difference:.2e} (relative)"


@pytest.mark.parametrize("written_by,resumed_with,nproc", [
    ("fsdp", [], 1),
    ("ddp", ["parallel=fsdp"], 2),
    ("pipeline-1f1b", [], 1),
])
def test_a_checkpoint_resumes_under_another_layout(written_by, resumed_with, nproc, reference,
                                                   strategy_runs, tmp_path):
    checkpoint = strategy_runs(written_by) / "checkpoints" / f"step_{SAVED_AT:06d}"
    run_dir = tmp_path / "run"
    args = [*resumed_with, *RUN, f"resume={checkpoint}", f"hydra.run.dir={run_dir}"]
    if nproc == 1:
        result = run_txtrain(*args, cwd=tmp_path)
    else:
        result = ranks(*args, nproc=nproc, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    tolerance = 1e-3 if "pipeline" in written_by else 1e-4
    assert_same_losses(run_dir, losses(reference), tolerance, range(SAVED_AT + 1, STEPS + 1))


def test_dp_without_two_gpus_says_so_and_trains_as_none(reference, tmp_path):
    run_dir = tmp_path / "run"
    result = run_txtrain("parallel=dp", *RUN, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "parallel=dp needs at least 2 GPUs" in result.stdout + result.stderr
    assert losses(run_dir) == losses(reference)


@pytest.mark.parametrize("name", ["none", "ddp", "fsdp", "fsdp-hybrid", "pipeline-1f1b"])
def test_the_memory_plan_counts_exactly_what_each_rank_holds(name, reference, strategy_runs):
    run_dir = reference if name == "none" else strategy_runs(name)
    ranks = json.loads((run_dir / "memory.json").read_text())
    nproc = 1 if name == "none" else STRATEGIES[name][1]
    assert [rank["rank"] for rank in ranks] == list(range(nproc))
    for rank in ranks:  # counted from the tensors after the first update
        assert rank["held"] == {key: rank["planned"][key] for key in ("params", "grads", "optimizer")}
        assert rank["measured_peak"] > 0
    whole = json.loads((reference / "memory.json").read_text())[0]["held"]["params"]
    if name.startswith(("fsdp", "pipeline")):  # the ranks split the model between them
        groups = 2 if name == "fsdp-hybrid" else 1
        assert sum(rank["held"]["params"] for rank in ranks) == groups * whole
        assert ranks[0]["held"]["params"] != ranks[1]["held"]["params"]  # 15-row embedding: 8 + 7
    else:
        assert all(rank["held"]["params"] == whole for rank in ranks)


def test_a_text_pipeline_tokenizes_once_and_samples_what_one_process_samples(tmp_path):
    """The text task under a 2-stage pipeline: one process tokenizes into a cold cache while the
    other waits; losses follow one process's; greedy samples, drawn from logits that only the
    last stage has, are the same text."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("SOCRATES: What is virtue, Meno?\nMENO: I do not know.\n" * 40)
    text_run = ["task=text", f"task.data.path={corpus}", "task.tokenizer=char", "task.seq_len=32",
                "task.prompts=[SOCRATES:]", "task.sample_tokens=30", "task.temperature=0",
                "model.max_seq_len=32", "model.n_layer=2", "model.tie_embeddings=false",
                "train.steps=12", "train.eval_every=6", "train.log_every=1", "progress=false"]
    one = run_txtrain(*text_run, f"task.cache_dir={tmp_path / 'cache1'}",
                      f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    two = ranks("parallel=pipeline", "train.batch_size=16", *text_run,
                   f"task.cache_dir={tmp_path / 'cache2'}", f"hydra.run.dir={tmp_path / 'two'}",
                   cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert len(list((tmp_path / "cache2" / "tokens").glob("*/dataset.json"))) == 1
    reference = losses(tmp_path / "one")
    assert_same_losses(tmp_path / "two", reference, 1e-3, range(1, 13))
    assert (tmp_path / "two" / "samples.txt").read_text() == (tmp_path / "one" / "samples.txt").read_text()
