"""Evaluation split over data-parallel ranks gives one process's figures, on every rank.

Under ddp and fsdp each rank scores every other held-out batch and the ranks add up their
per-batch sums. The checks run in one launch of this file on 2 ranks (gloo, forked as torchrun
would start them: ``worker`` at the bottom), against the same weights evaluated whole in the
same processes. The held-out batches mostly do not divide by 2 (5 batches, 3, 1): under fsdp
a rank with fewer batches still joins the others' forwards, whose weights it helps gather.
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

import forked
from conftest import make_config

MODEL = ["model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.dropout=0", "precision=fp32"]
COPY = ["task=copy", "task.n_symbols=3", "task.min_len=1", "task.max_len=4", "task.n_eval=50", *MODEL]
TEXT = ["task=text", "task.tokenizer=char", "task.seq_len=16", "model.max_seq_len=16",
        "task.val_fraction=0.1", "task.eval_tokens=176", "train.eval_batch_size=4",
        *MODEL]  # 11 windows: batches of 4, 4, 3
CASES = {  # name: overrides ({folder}: the test's folder)
    "copy": [*COPY, "train.eval_batch_size=10"],  # 5 batches, of a model that gets some right
    "copy-one-batch": [*COPY, "train.eval_batch_size=64"],  # rank 1 has none
    "text": [*TEXT, "task.data.path={folder}/corpus.txt", "task.cache_dir={folder}/cache"],
    "masked": [*TEXT, "model.arch=encoder", "task.data.path={folder}/corpus.txt",
               "task.cache_dir={folder}/cache"],
}
COUNTED = {"exact_match", "mlm_accuracy"}  # ratios of counts: exactly one process's


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("split")
    prepare(folder)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    ranks = forked.run([folder], folder, env, command=__file__, ranks=2)
    assert [rank.returncode for rank in ranks] == [0, 0], [rank.stderr[-3000:] for rank in ranks]
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", list(CASES))
def test_split_evaluation_gives_one_process_figures_on_every_rank(worker_results, strategy, case):
    checks = worker_results[strategy][case]
    expected, by_rank = checks["one_process"], checks["by_rank"]
    assert by_rank[1] == by_rank[0]  # to the bit: early stopping decides alike on every rank
    got = by_rank[0]
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == (value if key in COUNTED else pytest.approx(value, rel=1e-5)), key
    if case == "copy":  # the exact match of a half-trained model, neither none nor all
        assert 0 < got["exact_match"] < 1


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("case", list(CASES))
def test_each_rank_scores_only_its_share_of_the_batches(worker_results, strategy, case):
    checks = worker_results[strategy][case]
    rows = checks["batch_rows"]  # each held-out batch's rows, in order
    first, second = checks["forward_rows_by_rank"]
    assert first == rows[0::2]
    if strategy == "ddp":
        assert second == rows[1::2]
    else:  # one more forward, of one row, alongside rank 0's last
        assert second == rows[1::2] + [1] * (len(rows[0::2]) - len(rows[1::2]))
    assert len(rows) == {"copy": 5, "copy-one-batch": 1, "text": 3, "masked": 3}[case]


def prepare(folder: Path) -> None:
    """What the ranks share: the corpus, its tokens cached (before two ranks would both write
    them), and weights trained a little on copy, so that exact match counts something."""
    from txtrain.model import build_model, model_class
    from txtrain.model.chunked_loss import TokenLoss
    from txtrain.tasks import build_task

    (folder / "corpus.txt").write_text("SOCRATES: What is virtue, Meno?\nMENO: I do not know.\n" * 40)
    for case in ("text", "masked"):
        cfg = config(case, folder)
        build_task(cfg.task, cfg.seed, progress=False, model=model_class(cfg.model))
    cfg = config("copy", folder)
    task = build_task(cfg.task, cfg.seed, progress=False)
    torch.manual_seed(0)
    model = build_model(cfg.model, task.vocab_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(30):
        batch = task.train_batch(step, 32)
        model(*batch.model_args(), targets=batch.targets, loss=TokenLoss(divide_by=batch.n_targets)).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.save(model.state_dict(), folder / "copy.pt")


def config(case: str, folder: Path, *more: str):
    return make_config(*(override.format(folder=folder) for override in CASES[case]), *more)


# --- the worker: run on every rank ---------------------------------------------------------------
def worker(folder: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a stall fails, not hangs
    torch.set_grad_enabled(False)
    results = {strategy: {case: check(strategy, case, folder) for case in CASES}
               for strategy in ("ddp", "fsdp")}
    if dist.get_rank() == 0:
        (folder / "results.json").write_text(json.dumps(results))
    dist.barrier()
    gc.collect()  # the checks' wrappers hold the group: freed before it ends (see Trainer.close)
    dist.destroy_process_group()


def check(name: str, case: str, folder: Path) -> dict:
    """One evaluation split over the ranks, and the same weights evaluated whole."""
    from txtrain.model import build_model, model_class
    from txtrain.parallel.ddp import DDP
    from txtrain.parallel.fsdp import FSDP
    from txtrain.tasks import build_task

    cfg = config(case, folder, f"parallel={name}")
    task = build_task(cfg.task, cfg.seed, progress=False, model=model_class(cfg.model))
    torch.manual_seed(0)  # the same weights on every rank
    model = build_model(cfg.model, task.vocab_size).eval()
    if case.startswith("copy"):
        model.load_state_dict(torch.load(folder / "copy.pt"))
    whole = copy.deepcopy(model)
    strategy = DDP(cfg.parallel, "cpu") if name == "ddp" else FSDP(cfg.parallel, "cpu", "fp32")
    prepared = strategy.prepare(model).eval()
    forward_rows = []  # the rows of each forward this rank makes
    strategy.unwrap(prepared).register_forward_pre_hook(lambda module, args: forward_rows.append(len(args[0])))
    evaluation = task.evaluation(cfg.train.eval_batch_size)
    results = strategy.evaluate(prepared, evaluation)
    return {"by_rank": strategy.gather(results),
            "one_process": task.evaluate(whole, cfg.train.eval_batch_size),
            "forward_rows_by_rank": strategy.gather(forward_rows),
            "batch_rows": [len(evaluation.batch(i)) for i in range(evaluation.n_batches)]}


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
