"""optim=muon (Muon for the blocks' matrices, AdamW for the rest, one optimizer object) and
schedule=wsd's decay shapes: they learn, resume bit for bit, run under ddp and fsdp as in one
process, and the memory plan counts Muon's state."""

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import interrupted_copy, losses, make_config, run_ranks, run_txtrain
from txtrain.config import ScheduleConfig
from txtrain.optim import MuonAdamW, build_optimizer, lr_factor, orthogonalise, set_lr
from txtrain.train import Trainer

SMALL = ["model.n_layer=1", "model.n_embd=32", "task.n_eval=100", "task.max_len=6",
         "train.log_every=1", "train.eval_every=0", "train.save_every=0", "optim=muon",
         "schedule=wsd", "schedule.decay_shape=1-sqrt", "schedule.warmup_steps=2"]


def fit(run_dir: Path, *overrides: str) -> Trainer:
    trainer = Trainer(make_config(*SMALL, *overrides), run_dir)
    trainer.fit()
    return trainer


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    from txtrain.model import Transformer

    cfg = make_config(*SMALL, "optim.lr=1e-3", "optim.muon_lr=0.05")
    model = Transformer(cfg.model, 13)
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    assert isinstance(optimizer, MuonAdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    muon, *adamw = optimizer.param_groups
    assert muon["muon"] and not any(group["muon"] for group in adamw)
    in_muon = {names[id(p)] for p in muon["params"]}
    assert in_muon and all(name.startswith("blocks.") and name.endswith(".weight") for name in in_muon)
    rest = {names[id(p)] for group in adamw for p in group["params"]}
    assert {"token_embedding.weight", "final_norm.weight"} <= rest and not rest & in_muon
    assert all(p.dim() == 2 for p in muon["params"])
    set_lr(optimizer, 0.5e-3)  # the schedule scales both parts alike
    assert muon["lr"] == pytest.approx(0.025) and all(g["lr"] == 0.5e-3 for g in adamw)


def test_the_update_is_torch_muons():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(48, 16))
    theirs = weight.detach().clone().requires_grad_()
    ours = MuonAdamW([{"params": [weight], "muon": True, "weight_decay": 0.1}], lr=0.02,
                     betas=(0.9, 0.98), eps=1e-8, momentum=0.95)
    reference = torch.optim.Muon([theirs], lr=0.02, weight_decay=0.1, momentum=0.95)
    for _ in range(3):
        grad = torch.randn(48, 16)
        weight.grad, theirs.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    # torch's iterates in bf16, ours in fp32 on a CPU: the same up to bf16's rounding
    torch.testing.assert_close(weight.detach(), theirs.detach(), rtol=0, atol=2e-3)
    singular = torch.linalg.svdvals(orthogonalise(torch.randn(64, 32), 5))
    assert 0.5 < singular.min() and singular.max() < 1.3  # roughly orthogonal


@pytest.mark.parametrize("shape,expected", [
    # 10 steps, 2 of warm-up, decay_fraction 0.5: the last 4 decay towards the floor 0.1
    ("linear", [0.5, 1, 1, 1, 1, 1, 0.775, 0.55, 0.325, 0.1]),
    ("1-sqrt", [0.5, 1, 1, 1, 1, 1, 1 - 0.9 * math.sqrt(0.25), 1 - 0.9 * math.sqrt(0.5),
                1 - 0.9 * math.sqrt(0.75), 0.1]),
])
def test_wsd_decays_linearly_or_as_one_minus_sqrt(shape, expected):
    cfg = ScheduleConfig(name="wsd", warmup_steps=2, min_lr_ratio=0.1, decay_fraction=0.5,
                         decay_shape=shape)
    assert [lr_factor(cfg, step, 10) for step in range(10)] == pytest.approx(expected)


def test_muon_with_wsd_learns_reverse(tmp_path):
    trainer = fit(tmp_path, "model.n_embd=64", "train.steps=150", "train.eval_every=50",
                  "train.batch_size=32", "optim.muon_lr=0.03")
    matches = [json.loads(line)["exact_match"]
               for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert len(matches) == 3 and matches[0] < matches[-1] and matches[-1] >= 0.5, matches
    assert trainer.held["optimizer"] > 0


def test_a_resumed_muon_run_equals_an_uninterrupted_one(tmp_path):
    common = ["train.steps=8", "train.save_every=4", "train.batch_size=8", "model.dropout=0.1"]
    full = tmp_path / "full"
    fit(full, *common)
    interrupted = interrupted_copy(full, tmp_path / "interrupted", saved_at=4, last=8)
    trainer = fit(interrupted, *common)
    assert trainer.resumed_from.name == "step_000004"
    # Muon's momentum and AdamW's moments came back: the losses are the same, bit for bit
    assert losses(interrupted) == {s: loss for s, loss in losses(full).items() if s > 4}
    assert {"momentum_buffer", "exp_avg", "exp_avg_sq", "step"} == {
        key for state in trainer.optimizer.state.values() for key in state}


RUN = [*SMALL, "model.n_layer=2", "train.steps=6", "train.batch_size=16", "model.dropout=0",
       "model.tie_embeddings=false", "model.vocab_multiple=5", "train.save_every=3",
       "progress=false"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("none") / "run"
    result = run_txtrain(*RUN, f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Each strategy's run on two ranks, made once."""
    made = {}

    def run(parallel: str) -> Path:
        if parallel not in made:
            run_dir = tmp_path_factory.mktemp(parallel) / "run"
            result = run_ranks(f"parallel={parallel}", *RUN, f"hydra.run.dir={run_dir}",
                               cwd=run_dir.parent)
            assert result.returncode == 0, result.stderr[-3000:]
            made[parallel] = run_dir
        return made[parallel]

    return run


def assert_same_losses(got: dict, expected: dict, steps) -> None:
    assert sorted(got) == list(steps)
    worst = max(abs(got[s] - expected[s]) / expected[s] for s in steps)
    assert worst <= 1e-4, f"max relative loss difference {worst:.2e}"


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_muon_on_two_ranks_follows_one_process(parallel, one_process, two_ranks):
    run_dir = two_ranks(parallel)
    assert_same_losses(losses(run_dir), losses(one_process), range(1, 7))
    # The plan counts Muon's momentum and AdamW's moments exactly, whole or sharded
    for run in (one_process, run_dir):
        for rank in json.loads((run / "memory.json").read_text()):
            assert rank["held"]["optimizer"] == rank["planned"]["optimizer"], (run, rank)


def test_a_sharded_muon_checkpoint_resumes_in_one_process(one_process, two_ranks, tmp_path):
    checkpoint = two_ranks("fsdp") / "checkpoints" / "step_000003"
    run_dir = tmp_path / "run"
    result = run_txtrain(*RUN, f"resume={checkpoint}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "weights only" not in result.stdout + result.stderr  # the optimizer state came too
    assert_same_losses(losses(run_dir), losses(one_process), range(4, 7))
