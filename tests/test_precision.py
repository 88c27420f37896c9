"""Precision and robustness: fp16 loss scaling, non-finite losses, activation checkpointing."""

import json
from pathlib import Path

import pytest
import torch

from conftest import call_txtrain, make_config
from nonfinite import nan_loss_at, nan_loss_in_every_trainer
from txtrain.config import TrainingStopped
from txtrain.train import Trainer

SMALL = ["model.n_layer=1", "model.n_embd=32", "task.n_eval=100", "task.max_len=6",
         "train.log_every=1", "train.eval_every=0", "train.save_every=0", "train.batch_size=16"]


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_learns(tmp_path, precision):
    trainer = Trainer(make_config(*SMALL, f"precision={precision}", "train.steps=100",
                                  "optim.lr=1e-2", "schedule.warmup_steps=10"), tmp_path)
    trainer.fit()
    losses = [r["loss"] for r in records(tmp_path)]
    assert losses[-1] < 0.5 * losses[0]


def test_fp16_skips_steps_whose_gradients_overflow_and_recovers(tmp_path):
    """A scale far too large (2**40) overflows the fp16 gradients while the loss stays finite: the
    scaler skips those steps, halving the scale each time, and training goes on."""
    trainer = Trainer(make_config(*SMALL, "precision=fp16", "precision.init_scale=1099511627776",
                                  "train.steps=40"), tmp_path)
    trainer.fit()
    log = records(tmp_path)
    skipped = log[-1]["skipped_steps"]
    assert 0 < skipped < 40 and all(r["loss"] is not None for r in log)  # finite losses
    assert [r["loss_scale"] for r in log[:3]] == [2.0 ** 39, 2.0 ** 38, 2.0 ** 37]
    assert log[-1]["loss"] < log[skipped]["loss"]  # it learns once the scale fits


def test_fp16_stops_at_a_nonfinite_loss_as_fp32_does(tmp_path):
    """Loss scaling is for gradients that overflow; a non-finite loss from the forward pass
    follows the same policy in every precision (before: fp16 skipped them forever)."""
    fp16 = [*SMALL, "precision=fp16", "train.steps=12"]
    trainer = nan_loss_at(Trainer(make_config(*fp16), tmp_path / "stop"), range(2, 12))
    with pytest.raises(TrainingStopped, match="step 2: the loss is nan"):
        trainer.fit()
    trainer = nan_loss_at(Trainer(make_config(*fp16, "train.skip_nonfinite=3"), tmp_path / "skip"), range(2, 12))
    with pytest.raises(TrainingStopped, match="4 steps in a row"):
        trainer.fit()
    assert trainer.step == 4


def test_a_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    nan_loss_in_every_trainer(monkeypatch, [6])
    result = call_txtrain(*SMALL, "train.steps=20", "train.save_every=4", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.status == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: step 6: the loss is nan")
    assert "step_000004" in lines[0] and "train.skip_nonfinite" in lines[0]
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text().strip() == "step_000004"


def test_skip_nonfinite_skips_and_stops_after_that_many_in_a_row(tmp_path):
    common = [*SMALL, "train.steps=12", "train.skip_nonfinite=2"]
    trainer = nan_loss_at(Trainer(make_config(*common), tmp_path / "skips"), [3, 4, 8])
    trainer.fit()  # two in a row are allowed
    assert records(tmp_path / "skips")[-1]["skipped_steps"] == 3
    trainer = nan_loss_at(Trainer(make_config(*common), tmp_path / "stops"), [3, 4, 5])
    with pytest.raises(TrainingStopped, match="3 steps in a row"):
        trainer.fit()


def test_activation_checkpointing_gives_the_same_losses_and_gradients(tmp_path):
    """Dropout on: the recomputed forward must draw the same masks."""
    results = []
    for checkpointing in ("false", "true"):
        trainer = Trainer(make_config(*SMALL, "model.n_layer=2", "model.dropout=0.2", "train.steps=5",
                                      f"model.activation_checkpointing={checkpointing}"),
                          tmp_path / checkpointing)
        trainer.fit()
        batch = trainer.task.train_batch(99, 16)
        torch.manual_seed(7)
        loss = torch.nn.functional.cross_entropy(trainer.model(batch.inputs).flatten(0, 1),
                                                 batch.targets.flatten(), ignore_index=-100)
        loss.backward()
        grads = [p.grad.clone() for p in trainer.model.parameters()]
        results.append(([r["loss"] for r in records(tmp_path / checkpointing)], loss.item(), grads))
    (losses_off, loss_off, grads_off), (losses_on, loss_on, grads_on) = results
    assert losses_on == pytest.approx(losses_off, rel=1e-6)
    assert loss_on == pytest.approx(loss_off, rel=1e-6)
    for on, off in zip(grads_on, grads_off):
        torch.testing.assert_close(on, off, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("enabled", [True, False])
def test_tf32_is_set_so_that_every_reader_of_torchs_matmul_precision_can_read_it(enabled):
    """precision.tf32 on CUDA: both torch's newer per-backend setting and its older flags say
    the same (set through the newer alone, the older readers raised "mix of the legacy and new
    APIs": torch.get_float32_matmul_precision, which inductor's autotuning calls)."""
    from txtrain.precision import use_tf32

    try:
        use_tf32(enabled)
        assert torch.get_float32_matmul_precision() == ("high" if enabled else "highest")
        assert torch.backends.cuda.matmul.allow_tf32 is enabled and torch.backends.cudnn.allow_tf32 is enabled
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch 2.9 and later
            assert (torch.backends.cuda.matmul.fp32_precision == "tf32") is enabled
    finally:
        use_tf32(False)  # torch's default
