"""Evaluation and sampling under several processes give one process's numbers.

A pipeline stage sizes the activations it exchanges from the first batch it runs, but
evaluation feeds batches of several shapes: the held-out set rarely divides into equal
batches, and sampling feeds one growing row at a time. Under ddp and fsdp every rank samples
the same tokens because all draw from rank 0's logits.

The direct checks run in one torchrun launch of this file (``worker`` at the bottom), against
the whole model in the same processes; one short pipeline run of the command line checks
eval.jsonl and samples.txt against its checkpoint evaluated in this process.
"""

import copy
import gc
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import forked
from conftest import make_config
from txtrain.model.chunked_loss import DEFAULT_CHUNK_TOKENS
from test_parallel import evaluations, ranks

# Evaluation runs forwards alone, in the same order for gpipe and 1f1b (the command-line run
# below trains with 1f1b, the default).
PIPELINE_SCHEDULES = {"gpipe": [], "interleaved": ["parallel.stages_per_rank=2"]}
MODEL = ["model.n_layer=4", "model.n_embd=32", "model.n_head=2", "model.tie_embeddings=false",
         "model.dropout=0", "precision=fp32"]
# (rows, length) in sequence: a full batch, a short last one, rows that are not a multiple of
# the 4 micro-batches, and 4 rows followed by 16 (more than the stages were first built for).
EVAL_SHAPES = [(70, 17), (30, 9), (2, 17), (70, 17), (4, 5), (16, 12), (1, 3), (5, 33)]
PROMPT_LENGTHS = [3, 1, 12]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("worker") / "results.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ranks = forked.run([out], out.parent, env, command=__file__, ranks=2)
    assert [rank.returncode for rank in ranks] == [0, 0], [rank.stderr[-3000:] for rank in ranks]
    return json.loads(out.read_text())


@pytest.mark.parametrize("schedule", list(PIPELINE_SCHEDULES))
def test_pipeline_logits_match_one_process_for_any_batch_shape(worker_results, schedule):
    checks = worker_results["pipeline"][schedule]
    for (rows, length), difference in zip(EVAL_SHAPES, checks["max_logit_difference"]):
        assert difference < 1e-5, f"{rows} rows of {length}: logits differ by {difference:.3g}"
    assert checks["bf16_max_logit_difference"] < 0.01  # a shape built for fp32, under autocast


@pytest.mark.parametrize("schedule", list(PIPELINE_SCHEDULES))
def test_pipeline_task_evaluation_matches_one_process_with_ragged_batches(worker_results, schedule):
    # 100 held-out prompts in batches of 70 and 30, neither a multiple of the 4 micro-batches
    got, expected = worker_results["pipeline"][schedule]["task"]
    assert got["exact_match"] == expected["exact_match"]
    assert got["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("schedule", list(PIPELINE_SCHEDULES))
def test_pipeline_evaluation_loss_never_holds_a_batch_of_logits(worker_results, schedule):
    """The last stage takes evaluation's loss through the model's chunked head, as training
    does: no tensor as wide as the vocabulary has more rows than one chunk (the whole model's
    evaluation, in the same processes, counts too)."""
    # a batch is 70 rows of up to 33 positions: its logits would have 2310 rows
    assert worker_results["pipeline"][schedule]["largest_logits_rows"] <= DEFAULT_CHUNK_TOKENS


@pytest.mark.parametrize("schedule", list(PIPELINE_SCHEDULES))
def test_pipeline_sampling_matches_one_process(worker_results, schedule):
    checks = worker_results["pipeline"][schedule]
    assert checks["samples"] == checks["expected_samples"]  # prompts of several lengths
    assert checks["several_rows_difference"] < 1e-5  # next-token logits of 3 rows at once


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_rank_samples_from_rank_0_logits(worker_results, strategy):
    """Rank 1's model gives other logits than rank 0's: every rank still draws rank 0's tokens."""
    checks = worker_results["broadcast"][strategy]
    assert checks["tokens_by_rank"] == [checks["rank_0_alone"]] * 2
    assert checks["own_tokens_differ"], "the test's ranks must disagree without the broadcast"


def test_pipeline_run_evaluates_and_samples_like_its_checkpoint_in_one_process(tmp_path):
    """A text run under pipeline x2 (eval every 2 steps: 11 held-out windows in batches of 9
    and 2; two prompts of different lengths) writes what one process computes from its final
    checkpoint."""
    from txtrain.generate import complete
    from txtrain.sample import load_model
    from txtrain.tasks import build_task

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("SOCRATES: What is virtue, Meno?\nMENO: I do not know.\n" * 40)
    overrides = ["task=text", f"task.data.path={corpus}", "task.tokenizer=char",
                 f"task.cache_dir={tmp_path / 'cache'}", "task.seq_len=16", "model.max_seq_len=16",
                 "task.val_fraction=0.1", "task.eval_tokens=176", "task.sample_tokens=10",
                 "task.prompts=[S,MENO: I]", "train.steps=4", "train.eval_every=2",
                 "train.save_every=4", "train.batch_size=8", "train.eval_batch_size=9", *MODEL,
                 "model.n_layer=2"]
    run_dir = tmp_path / "run"
    result = ranks("parallel=pipeline", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    cfg = make_config(*overrides)
    task = build_task(cfg.task, cfg.seed, progress=False)
    model, _, _ = load_model(run_dir, torch.device("cpu"))
    with torch.no_grad():
        expected = task.evaluate(model, cfg.train.eval_batch_size)
        samples = [complete(lambda inputs: model(inputs, last_only=True), task.codec, prompt,
                            task.sampling, cfg.seed + i, context=task.max_seq_len)
                   for i, prompt in enumerate(task.sampling.prompts)]
    evals = evaluations(run_dir)
    assert [e["step"] for e in evals] == [2, 4]
    assert evals[-1]["val_loss"] == pytest.approx(expected["val_loss"], rel=1e-5)
    last_step = (run_dir / "samples.txt").read_text().split("=== step 4 ===\n")[1]
    assert last_step == "".join(f"--- prompt {p!r} ---\n{p}{text}\n"
                                for p, text in zip(task.sampling.prompts, samples))


# --- the worker: run by torchrun on every rank --------------------------------------------------
class LargestLogits(TorchDispatchMode):
    """The most rows of any tensor made whose last dimension is ``width``."""

    def __init__(self, width: int):
        super().__init__()
        self.width, self.rows = width, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 2 and tensor.shape[-1] == self.width:
                self.rows = max(self.rows, tensor.numel() // tensor.shape[-1])
        return out

    def largest_on_any_rank(self) -> int:
        import torch.distributed as dist

        rows = torch.tensor(self.rows)
        dist.all_reduce(rows, op=dist.ReduceOp.MAX)
        return int(rows)


def worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a stall fails, not hangs
    torch.set_grad_enabled(False)
    results = {"broadcast": check_broadcast(),
               "pipeline": {name: check_pipeline(name) for name in PIPELINE_SCHEDULES}}
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.barrier()
    gc.collect()  # the checks' wrappers hold the group: freed before it ends (see Trainer.close)
    dist.destroy_process_group()


def check_broadcast() -> dict:
    """generate under ddp and fsdp, with a model whose logits depend on the rank."""
    import torch.distributed as dist

    from txtrain.generate import draw_tokens
    from txtrain.parallel.ddp import DDP
    from txtrain.parallel.fsdp import FSDP

    class RankLogits(torch.nn.Module):
        def __init__(self, rank: int):
            super().__init__()
            self.rank = rank

        def forward(self, inputs, last_only=False):
            generator = torch.Generator().manual_seed(1000 * self.rank + inputs.shape[1])
            return torch.randn(inputs.shape[0], 50, generator=generator)

    def draw(next_logits):
        return draw_tokens(next_logits, [1, 2, 3], 12, temperature=1.0,
                           generator=torch.Generator().manual_seed(0))

    rank, results = dist.get_rank(), {}
    for name, strategy_class in {"ddp": DDP, "fsdp": FSDP}.items():
        strategy = strategy_class(make_config(f"parallel={name}").parallel, "cpu")
        tokens = strategy.generate(RankLogits(rank), draw)
        own_tokens = strategy.gather(draw(RankLogits(rank)))
        results[name] = {"tokens_by_rank": strategy.gather(tokens),
                         "rank_0_alone": draw(RankLogits(0)),
                         "own_tokens_differ": own_tokens[0] != own_tokens[1]}
    return results


def check_pipeline(schedule: str) -> dict:
    """Logits, task evaluation and sampling through a pipeline against the whole model."""
    from txtrain.generate import draw_tokens
    from txtrain.model import build_model
    from txtrain.parallel.pipeline import Pipeline
    from txtrain.tasks import build_task

    cfg = make_config("parallel=pipeline", f"parallel.schedule={schedule}",
                      *PIPELINE_SCHEDULES[schedule], *MODEL, "task.n_eval=100")
    task = build_task(cfg.task, cfg.seed)
    seq_len = max(task.max_seq_len, max(length for _, length in EVAL_SHAPES))
    torch.manual_seed(0)  # the same weights on every rank
    model = build_model(cfg.model, task.vocab_size).eval()
    whole = copy.deepcopy(model)
    strategy = Pipeline(cfg.parallel, "cpu", seq_len)
    staged = strategy.prepare(model).eval()
    inputs = torch.Generator().manual_seed(1)

    def random_batch(rows: int, length: int) -> torch.Tensor:
        return torch.randint(0, task.vocab_size, (rows, length), generator=inputs)

    def logit_difference(batch: torch.Tensor) -> float:
        got = strategy.evaluate(staged, lambda forward: {"logits": forward(batch)})["logits"]
        return float((got.float() - whole(batch).float()).abs().max())

    results = {"max_logit_difference": [logit_difference(random_batch(*shape))
                                        for shape in EVAL_SHAPES]}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # shapes already seen, now under autocast
        results["bf16_max_logit_difference"] = logit_difference(random_batch(2, 17))
    widest = LargestLogits(task.vocab_size)  # 13 (padded to 64, which the kv projection also is)
    with widest:
        results["task"] = (strategy.evaluate(staged, lambda forward: task.evaluate(forward, 70)),
                           task.evaluate(whole, 70))
    results["largest_logits_rows"] = widest.largest_on_any_rank()

    def draw_all(next_logits):
        return [draw_tokens(next_logits, random_batch(1, length)[0].tolist(), 5, temperature=1.0,
                            generator=torch.Generator().manual_seed(length), context=seq_len)
                for length in PROMPT_LENGTHS]

    inputs.manual_seed(2)
    results["samples"] = strategy.generate(staged, draw_all)
    inputs.manual_seed(2)
    results["expected_samples"] = draw_all(lambda batch: whole(batch, last_only=True))
    rows = random_batch(3, 10)
    got = strategy.generate(staged, lambda next_logits: next_logits(rows))
    results["several_rows_difference"] = float((got - whole(rows, last_only=True)).abs().max())
    return results


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
