"""logger=wandb: the run's scalars and config in wandb's offline files, one wandb run across a
resume, and the one-line errors of a missing package and an unknown logger."""

import json
import struct
import sys
from pathlib import Path

import pytest

from conftest import call_txtrain, losses, make_config, run_txtrain
from txtrain.config import ConfigError
from txtrain.metrics import RunLog

SMALL = ["model.n_layer=1", "model.n_embd=32", "task.n_eval=50", "train.batch_size=8",
         "train.log_every=2", "train.eval_every=3"]


def wandb_records(path: Path) -> list:
    """The records of a ``run-<id>.wandb`` file: wandb's transaction log, LevelDB's log format
    (32 KiB blocks of chunks: crc32c, length, kind; a record may span blocks) after a 7-byte
    header, each record a protobuf ``Record``."""
    pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def offline_run(folder: Path) -> dict:
    """What an offline run folder holds: its run id, config and history (step -> {key: value})."""
    records = wandb_records(next(folder.glob("run-*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            history[record.history.step.num] = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                                for item in record.history.item}
    assert records[-1].WhichOneof("record_type") == "exit"  # the run was finished
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    return {"id": run.run_id, "config": config, "history": history}


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network, no account
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing in the home dir
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def test_wandb_logs_the_scalars_and_config_and_a_resume_continues_the_same_run(tmp_path, offline):
    run_dir = tmp_path / "run"
    first = run_txtrain(*SMALL, "logger=[tensorboard,wandb]", "train.steps=4", f"hydra.run.dir={run_dir}",
                        cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines()[-1].startswith("done: step 4")  # wandb keeps off stdout's last line
    assert any((run_dir / "tensorboard").iterdir())  # both loggers, besides JSONL
    [folder] = (run_dir / "wandb").glob("offline-run-*")
    logged = offline_run(folder)
    assert logged["id"] == (run_dir / "wandb" / "run_id").read_text().strip()
    assert logged["config"]["model"]["n_layer"] == 1 and logged["config"]["train"]["steps"] == 4
    assert logged["config"]["logger"] == ["tensorboard", "wandb"]
    history = logged["history"]
    assert sorted(history) == [2, 3, 4]  # wandb's step is the training step: logs at 2, 4, evals at 3, 4
    written = losses(run_dir)
    assert {step: history[step]["train/loss"] for step in (2, 4)} == pytest.approx(written)
    assert {"train/lr", "train/tokens_per_s", "train/grad_norm"} <= history[2].keys()
    assert "eval/exact_match" in history[3] and "memory/rank0_peak_bytes" in history[4]

    # Continued to more steps from its checkpoint at step 4: the same wandb run
    resumed = run_txtrain(*SMALL, "logger=wandb", "train.steps=6", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    [later] = set((run_dir / "wandb").glob("offline-run-*")) - {folder}  # offline: one folder per process
    continued = offline_run(later)
    assert continued["id"] == logged["id"]
    assert sorted(continued["history"]) == [6]
    assert continued["history"][6]["train/loss"] == pytest.approx(losses(run_dir)[6])


@pytest.mark.parametrize("overrides,loggers", [((), ["jsonl"]), (("logger=tensorboard",), ["tensorboard"]),
                                               (("logger=[tensorboard,wandb]",), ["tensorboard", "wandb"]),
                                               (("logger=[wandb,wandb]",), ["wandb"])])
def test_logger_is_one_name_or_a_list(overrides, loggers):
    assert make_config(*overrides).logger == loggers


def test_an_unknown_logger_is_one_line_naming_the_choices():
    outcome = call_txtrain("logger=[tensorboard,wandbb]", "plan=true")
    assert outcome.status == 2
    [line] = outcome.stderr.strip().splitlines()
    assert line.startswith("error: logger: unknown logger 'wandbb'")
    assert "jsonl, tensorboard or wandb" in line


def test_without_the_wandb_package_logger_wandb_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"^logger=wandb needs the wandb package: pip install 'txtrain\[wandb\]'$"):
        RunLog(tmp_path, enabled=True, progress=False, start_step=0, total_steps=1, loggers=["wandb"])
