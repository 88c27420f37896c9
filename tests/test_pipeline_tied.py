"""A pipeline with tied embeddings (GPT's default) trains exactly like one process.

The first stage holds the matrix as the embedding, the last as the head's weight, and the two
sum its gradient before each update (Megatron-LM's way). Every schedule must reproduce one
tied process's losses and gradient norms (the norm, which clipping uses, counts the matrix
once); checkpoints hold the matrix once, as one process's do, and resume across
the two layouts on the same trajectory.
"""

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from conftest import make_config, run_txtrain
from test_parallel import assert_same_losses, ranks
from txtrain.checkpoint import STATE_DIR, load_model_weights
from txtrain.model import Transformer
from txtrain.resume import CheckpointMeta

STEPS, SAVED = 6, 3
# 4 blocks: 2 stages of 2, or 4 of 1 interleaved; 13 symbols padded to 15 rows. The gradient
# norm starts above train.grad_clip=1: counting the tied matrix twice would change the steps.
RUN = [f"train.steps={STEPS}", f"train.save_every={SAVED}", "train.eval_every=0",
       "train.log_every=1", "train.batch_size=16", "task.n_eval=16", "task.max_len=6",
       "model.n_layer=4", "model.n_embd=32", "model.n_head=2", "model.tie_embeddings=true",
       "model.vocab_multiple=5", "model.dropout=0", "schedule.warmup_steps=1", "precision=fp32",
       "progress=false"]
SCHEDULES = {
    "gpipe": ["parallel.schedule=gpipe"],
    "1f1b": ["parallel.schedule=1f1b"],
    "interleaved": ["parallel.schedule=interleaved", "parallel.stages_per_rank=2"],
}
TOLERANCE = 1e-3  # relative, as for the untied pipelines in test_parallel.py


def records(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}


def checkpoint(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step_{step:06d}"


def saved_keys(folder: Path) -> set[str]:
    return set(FileSystemReader(str(folder / STATE_DIR)).read_metadata().state_dict_metadata)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("none") / "run"
    result = run_txtrain(*RUN, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr
    return run_dir


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    made = {}

    def run(schedule: str) -> Path:
        if schedule not in made:
            run_dir = tmp_path_factory.mktemp(schedule) / "run"
            result = ranks("parallel=pipeline", *SCHEDULES[schedule], *RUN,
                           f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
            assert result.returncode == 0, result.stderr[-3000:]
            made[schedule] = run_dir
        return made[schedule]

    return run


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_a_tied_pipeline_reproduces_one_process(schedule, reference, pipeline_runs):
    run_dir = pipeline_runs(schedule)
    assert_same_losses(run_dir, {s: r["loss"] for s, r in records(reference).items()}, TOLERANCE,
                       range(1, STEPS + 1))
    got, expected = records(run_dir), records(reference)
    assert expected[1]["grad_norm"] > 1  # clipped: a norm counting the matrix twice would show
    for step in range(1, STEPS + 1):
        assert got[step]["grad_norm"] == pytest.approx(expected[step]["grad_norm"], rel=TOLERANCE)


def test_the_checkpoint_holds_the_matrix_once_as_one_process_does(reference, pipeline_runs):
    saved = checkpoint(pipeline_runs("1f1b"), STEPS)
    keys = saved_keys(saved)
    assert keys == saved_keys(checkpoint(reference, STEPS))
    assert "model.token_embedding.weight" in keys
    assert not any(key.startswith(("model.head.", "optimizer.state.head.")) for key in keys)
    model, expected = (Transformer(make_config(*RUN).model, CheckpointMeta.load(saved).vocab_size)
                       for _ in range(2))
    # And the final weights are one process's.
    load_model_weights(saved, model)
    load_model_weights(checkpoint(reference, STEPS), expected)
    got_vector = torch.cat([p.detach().flatten() for p in model.parameters()])
    expected_vector = torch.cat([p.detach().flatten() for p in expected.parameters()])
    assert (got_vector - expected_vector).norm() / expected_vector.norm() <= TOLERANCE


def test_the_memory_plan_counts_the_tied_matrix_on_both_ranks(reference, pipeline_runs):
    ranks_memory = json.loads((pipeline_runs("1f1b") / "memory.json").read_text())
    for rank in ranks_memory:
        planned = {key: rank["planned"][key] for key in ("params", "grads", "optimizer")}
        assert rank["held"] == planned
    whole = json.loads((reference / "memory.json").read_text())[0]["held"]["params"]
    matrix = 15 * 32 * 4  # 15 rows of 32, fp32
    assert sum(rank["held"]["params"] for rank in ranks_memory) == whole + matrix


@pytest.mark.parametrize("written_by", ["pipeline", "none"])
def test_a_tied_checkpoint_resumes_under_the_other_layout(written_by, reference, pipeline_runs,
                                                          tmp_path):
    run_dir = tmp_path / "run"
    if written_by == "pipeline":
        args = [*RUN, f"resume={checkpoint(pipeline_runs('1f1b'), SAVED)}",
                f"hydra.run.dir={run_dir}"]
        result = run_txtrain(*args, cwd=tmp_path)
    else:
        args = ["parallel=pipeline", *RUN, f"resume={checkpoint(reference, SAVED)}",
                f"hydra.run.dir={run_dir}"]
        result = ranks(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_losses(run_dir, {s: r["loss"] for s, r in records(reference).items()}, TOLERANCE,
                       range(SAVED + 1, STEPS + 1))
