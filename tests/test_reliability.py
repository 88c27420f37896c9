"""Checkpoints survive damage: a truncated or altered one is detected and passed over, a failed
save leaves the previous one intact, and retention keeps the newest."""

import logging
from pathlib import Path

import pytest

from conftest import losses, make_config, run_txtrain
from txtrain import checkpoint
from txtrain.checkpoint import Checkpoints, DamagedCheckpoint, verify
from txtrain.config import ConfigError
from txtrain.train import Trainer

# The smallest model and batch that still make checkpoints worth damaging.
RUN = ["train.log_every=1", "train.eval_every=0", "train.save_every=5", "model.n_layer=1", "model.n_embd=32",
       "model.n_head=2", "train.batch_size=16", "task.n_eval=50"]


def train(run_dir: Path, *overrides: str) -> Trainer:
    trainer = Trainer(make_config(*RUN, *overrides), run_dir)
    trainer.fit()
    return trainer


def truncate_largest_file(checkpoint: Path) -> Path:
    largest = max((f for f in checkpoint.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    return largest


def test_a_truncated_latest_checkpoint_is_passed_over_and_the_run_continues_exactly(tmp_path, caplog):
    train(tmp_path / "whole", "train.steps=20")
    run = tmp_path / "broken"
    train(run, "train.steps=15")
    truncate_largest_file(run / "checkpoints" / "step_000015")
    with caplog.at_level(logging.INFO, logger="txtrain"):
        resumed = train(run, "train.steps=20")
    assert resumed.resumed_from.name == "step_000010"
    assert "step_000015 is damaged" in caplog.text and "passed over" in caplog.text
    assert [losses(run)[s] for s in range(11, 21)] == [losses(tmp_path / "whole")[s] for s in range(11, 21)]
    verify(run / "checkpoints" / "step_000015")  # written again, whole


def test_a_changed_byte_fails_the_checksum(tmp_path):
    train(tmp_path, "train.steps=5")
    meta = tmp_path / "checkpoints" / "step_000005" / "meta.pt"
    data = bytearray(meta.read_bytes())
    data[len(data) // 2] ^= 0xFF
    meta.write_bytes(bytes(data))
    with pytest.raises(DamagedCheckpoint, match="meta.pt does not match the checksum"):
        verify(meta.parent)


def test_resuming_from_a_damaged_checkpoint_by_path_is_a_one_line_error(tmp_path):
    train(tmp_path / "run", "train.steps=5")
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000005"
    (checkpoint / "manifest.json").unlink()
    done = run_txtrain(*RUN, f"resume={checkpoint}", f"hydra.run.dir={tmp_path / 'next'}", "train.steps=10",
                       "progress=false", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: checkpoint") and "incomplete or damaged" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_when_every_checkpoint_is_damaged_resume_auto_says_so(tmp_path):
    train(tmp_path, "train.steps=10")
    for folder in Checkpoints(tmp_path / "checkpoints").saved():
        truncate_largest_file(folder)
    with pytest.raises(DamagedCheckpoint, match="every checkpoint .* is damaged"):
        Trainer(make_config(*RUN, "train.steps=20"), tmp_path)


def test_keep_last_keeps_the_newest_checkpoints(tmp_path):
    train(tmp_path, "train.steps=20", "train.keep_last=2")
    assert [p.name for p in Checkpoints(tmp_path / "checkpoints").saved()] == ["step_000015", "step_000020"]


def test_a_failed_save_leaves_the_previous_checkpoint_and_the_run_goes_on(tmp_path, caplog, monkeypatch):
    write_state = checkpoint.write_state

    def disk_full_at_step_10(folder, state):
        if folder.name == ".step_000010.tmp":
            (folder / "state").mkdir(parents=True)  # something half-written first
            raise OSError(28, "No space left on device")
        return write_state(folder, state)

    monkeypatch.setattr(checkpoint, "write_state", disk_full_at_step_10)
    with caplog.at_level(logging.INFO, logger="txtrain"):
        trainer = train(tmp_path, "train.steps=15")
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in checkpoints.saved()] == ["step_000005", "step_000015"]
    assert trainer.step == 15 and checkpoints.latest().name == "step_000015"
    assert not list(checkpoints.directory.glob(".*.tmp"))  # nothing half-written is left
    assert "saving the checkpoint of step 10 failed" in caplog.text
    assert "No space left on device" in caplog.text and "step_000005) is intact" in caplog.text


def test_starting_over_in_a_run_dir_with_checkpoints_needs_overwrite(tmp_path):
    train(tmp_path, "train.steps=10")
    before = sorted(p.name for p in (tmp_path / "checkpoints").rglob("*"))
    with pytest.raises(ConfigError, match="already holds a run's checkpoints .* overwrite=true"):
        Trainer(make_config(*RUN, "train.steps=5", "resume=never"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").rglob("*")) == before  # untouched

    trainer = train(tmp_path, "train.steps=5", "resume=never", "overwrite=true", "seed=1")
    assert trainer.resumed_from is None and trainer.step == 5
    assert [p.name for p in Checkpoints(tmp_path / "checkpoints").saved()] == ["step_000005"]
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4, 5]  # the old run's log went with it
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 5
