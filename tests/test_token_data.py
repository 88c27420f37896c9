"""Training on token folders: prepared datasets, llm.c shards and nanoGPT's files, read in place."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import SHARED, call_txtrain, losses, run_txtrain
from test_prepare import run_prepare, write_inputs
from txtrain.config import ConfigError, CorpusConfig, TextTaskConfig
from txtrain.tasks.prepared import DATASET_FILE
from txtrain.tasks.shards import HEADER_INTS
from txtrain.tasks.text import TextTask

SOCRATES = SHARED / "data" / "socrates"
TINY = ["task=text", "task.seq_len=16", "model.max_seq_len=16", "model.n_layer=1", "model.n_embd=32",
        "model.n_head=2", "train.batch_size=8", "train.log_every=1", "train.eval_every=0",
        "train.save_every=0", "task.sample_tokens=0", "task.eval_tokens=64"]


def llmc_shard(path: Path, tokens, magic=20240520, version=1, count=None, dtype=np.uint16) -> Path:
    """A shard exactly as llm.c's and modded-nanogpt's writers make one."""
    header = np.zeros(HEADER_INTS, dtype=np.int32)
    header[:3] = magic, version, len(tokens) if count is None else count
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as file:
        file.write(header.tobytes())
        file.write(np.asarray(tokens, dtype=dtype).tobytes())
    return path


def text_task(path: Path, tmp_path: Path, **fields) -> TextTask:
    fields = {"tokenizer": "bytes", "seq_len": 8, "cache_dir": str(tmp_path / "cache"), **fields}
    return TextTask(TextTaskConfig(data=CorpusConfig(path=str(path)), **fields), seed=0, progress=False)


def test_llmc_shards_read_as_one_stream_with_windows_across_their_ends(tmp_path):
    stream = np.arange(3000) % 251
    for i, (a, b) in enumerate([(0, 700), (700, 1900), (1900, 2600)]):
        llmc_shard(tmp_path / "web" / f"web_train_{i:06d}.bin", stream[a:b])
    llmc_shard(tmp_path / "web" / "web_val_000000.bin", stream[2600:])
    task = text_task(tmp_path / "web", tmp_path)
    assert len(task.train_tokens) == 2600 and len(task.val_tokens) == 400
    for step in range(10):
        batch = task.train_batch(step, 16)
        rows = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
        # each window is the stream at some offset: ids that go up by one, mod 251
        assert torch.all((rows[:, 1:] - rows[:, :-1]) % 251 == 1)
    crossing = task.train_tokens.windows(np.array([695, 1895, 0, 2591]), 9)
    assert np.array_equal(crossing, np.stack([stream[a:a + 9] for a in (695, 1895, 0, 2591)]))
    seen = []
    task.evaluate(lambda inputs: seen.append(inputs) or torch.zeros(*inputs.shape, 256), 4)
    assert torch.equal(torch.cat(seen).flatten(), torch.from_numpy(stream[2600:2600 + 392]).long())


def test_a_nanogpt_folder_reads_train_val_and_its_character_vocabulary(tmp_path):
    text = "to be or not to be, that is the question. " * 40
    chars = sorted(set(text))
    encode = {ch: i for i, ch in enumerate(chars)}
    data = np.array([encode[ch] for ch in text], dtype=np.uint16)
    folder = tmp_path / "shakespeare_char"
    folder.mkdir()
    data[:1500].tofile(folder / "train.bin")
    data[1500:].tofile(folder / "val.bin")
    with (folder / "meta.pkl").open("wb") as file:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": encode}, file)
    task = text_task(folder, tmp_path, tokenizer="char")
    assert task.vocab_size == len(chars) and task.codec.decode(task.codec.encode("to be")) == "to be"
    batch = task.train_batch(0, 4)
    assert task.codec.decode(batch.inputs[0].tolist()) in text[:1500]
    assert len(task.val_tokens) == len(text) - 1500
    with pytest.raises(ConfigError, match="character vocabulary: set task.tokenizer=char"):
        text_task(folder, tmp_path, tokenizer="bytes")


def test_a_nanogpt_folder_without_meta_is_gpt2_token_ids(tmp_path):
    folder = tmp_path / "owt"
    folder.mkdir()
    np.arange(1000, dtype=np.uint16).tofile(folder / "train.bin")
    np.arange(100, dtype=np.uint16).tofile(folder / "val.bin")
    ranks = SHARED / "tiktoken" / "gpt2.tiktoken"
    if not ranks.is_file():
        pytest.skip(f"GPT-2 ranks not found at {ranks}")
    task = text_task(folder, tmp_path, tokenizer="gpt2", tokenizer_file=str(ranks))
    assert task.vocab_size == 50257 and len(task.train_tokens) == 1000
    assert torch.equal(task.train_batch(0, 2).targets - task.train_batch(0, 2).inputs,
                       torch.ones(2, 8, dtype=torch.long))


@pytest.mark.parametrize("damage,message", [
    ("magic", "magic 12345 version 1"),
    ("version", "magic 20240520 version 3"),
    ("truncated", "truncated or damaged"),
    ("count", "truncated or damaged"),
    ("ids", "token id 300, beyond the vocabulary of 256"),
    ("header only", "shorter than a shard's"),
])
def test_a_damaged_shard_is_one_line_and_status_2(tmp_path, damage, message):
    folder = tmp_path / "data"
    tokens = np.arange(400) % 200
    llmc_shard(folder / "d_val_000000.bin", tokens[:100])
    shard = folder / "d_train_000000.bin"
    if damage == "magic":
        llmc_shard(shard, tokens, magic=12345)
    elif damage == "version":
        llmc_shard(shard, tokens, version=3)
    elif damage == "count":
        llmc_shard(shard, tokens, count=500)
    elif damage == "ids":
        llmc_shard(shard, np.full(400, 300))
    else:
        llmc_shard(shard, tokens)
        with shard.open("r+b") as file:
            file.truncate(1000 if damage == "header only" else shard.stat().st_size - 7)
    outcome = call_txtrain(*TINY, f"task.data.path={folder}", "task.tokenizer=bytes", "train.steps=1",
                           f"hydra.run.dir={tmp_path / 'run'}")
    assert outcome.status == 2, outcome.stderr
    errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], outcome.stderr
    assert "Traceback" not in outcome.stderr


def test_a_uint32_shard_of_a_large_vocabulary_is_read(tmp_path):
    llmc_shard(tmp_path / "d" / "d_train_000000.bin", np.arange(70_000, 70_500), magic=20240801, version=7,
               dtype=np.uint32)
    task = text_task(tmp_path / "d", tmp_path)
    assert task.train_tokens.shards[0].dtype == np.uint32 and task.train_tokens.read(0, 2).tolist() == [70_000, 70_001]
    with pytest.raises(ConfigError, match="token id 7"):  # ids above the run's vocabulary of 256
        task.train_batch(0, 2)


def test_a_prepared_dataset_of_another_tokenizer_or_unfinished_is_refused(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    assert run_prepare(inputs["txt"], "--out", tmp_path / "chars", "--tokenizer", "char", "--workers", 1)[0] == 0
    with pytest.raises(ConfigError, match="tokenized with char, and this run says task.tokenizer=bytes"):
        text_task(tmp_path / "chars", tmp_path)
    assert text_task(tmp_path / "chars", tmp_path, tokenizer="char").codec.name == "char"
    (tmp_path / "chars" / ".prepare.json").write_text("{}")
    (tmp_path / "chars" / DATASET_FILE).unlink()
    with pytest.raises(ConfigError, match="did not finish"):
        text_task(tmp_path / "chars", tmp_path, tokenizer="char")


def test_a_prepared_folder_and_the_text_folder_give_the_same_batches(tmp_path):
    """The text path writes its cache with the same writer: the same corpus prepared by hand
    (no validation shards) is read as the same tokens, split and batches."""
    inputs = write_inputs(tmp_path / "in")
    assert run_prepare(inputs["txt"], "--out", tmp_path / "prepared", "--tokenizer", "bytes",
                       "--val-fraction", 0, "--shard-tokens", 500, "--workers", 1)[0] == 0
    from_text, prepared = text_task(inputs["txt"], tmp_path), text_task(tmp_path / "prepared", tmp_path)
    assert len(prepared.train_tokens.shards) > 2
    assert (len(from_text.train_tokens), len(from_text.val_tokens)) == (len(prepared.train_tokens),
                                                                        len(prepared.val_tokens))
    for step in range(5):
        assert torch.equal(from_text.train_batch(step, 8).inputs, prepared.train_batch(step, 8).inputs)


def test_resident_memory_and_start_up_stay_flat_on_a_2_gb_token_set(tmp_path):
    """Two shards of 1 GB (500M tokens each, on disk as sparse files) against a 1 MB set: a
    run reads only the windows it trains on, so it neither holds nor waits for the rest."""
    small, large = tmp_path / "small", tmp_path / "large"
    llmc_shard(small / "s_train_000000.bin", np.arange(500_000) % 256)
    llmc_shard(small / "s_val_000000.bin", np.arange(1000) % 256)
    for i in range(2):
        path = llmc_shard(large / f"l_train_{i:06d}.bin", [], count=500_000_000)
        with path.open("r+b") as file:
            file.truncate(path.stat().st_size + 1_000_000_000)  # a hole: zeros, token 0
    llmc_shard(large / "l_val_000000.bin", np.arange(1000) % 256)
    measured = {}
    for name, folder in (("small", small), ("large", large)):
        run_dir = tmp_path / f"run-{name}"
        result = run_txtrain(*TINY, f"task.data.path={folder}", "task.tokenizer=bytes", "train.steps=20",
                             f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(losses(run_dir)) == 20
        measured[name] = result.maxrss / 1024, json.loads((run_dir / "run.json").read_text())["startup_s"]
    (small_mb, small_s), (large_mb, large_s) = measured["small"], measured["large"]
    assert large_mb < small_mb + 20, f"resident {large_mb:.0f} MB on 2 GB of tokens vs {small_mb:.0f} MB on 1 MB"
    assert large_s < small_s + 1, f"start-up {large_s:.2f}s on 2 GB of tokens vs {small_s:.2f}s on 1 MB"


@pytest.mark.skipif(not SOCRATES.is_dir(), reason=f"the Socratic dialogues are not at {SOCRATES}")
def test_the_dialogues_prepared_with_two_workers_equal_their_text_cache(tmp_path):
    """On the real corpus: txtrain-prepare's shards (2 workers, several shards) hold exactly the
    tokens the text path's cache holds."""
    ranks = SHARED / "tiktoken" / "gpt2.tiktoken"
    if not ranks.is_file():
        pytest.skip(f"GPT-2 ranks not found at {ranks}")
    status, err = run_prepare(SOCRATES, "--out", tmp_path / "prepared", "--tokenizer-file", ranks,
                              "--workers", 2, "--shard-tokens", 300_000, "--val-fraction", 0)
    assert status == 0, err
    fields = {"tokenizer": "gpt2", "tokenizer_file": str(ranks), "seq_len": 64}
    cached, prepared = text_task(SOCRATES, tmp_path, **fields), text_task(tmp_path / "prepared", tmp_path, **fields)
    assert len(prepared.train_tokens.shards) == 5  # 1.26M tokens, 300k a shard
    for a, b in ((cached.train_tokens, prepared.train_tokens), (cached.val_tokens, prepared.val_tokens)):
        assert np.array_equal(a.read(0, len(a)), b.read(0, len(b)))


def test_a_run_on_shards_resumes_exactly_under_another_layout(tmp_path):
    """fsdp on two ranks saves at step 6; one process resumes it. Both follow the uninterrupted
    one-process run: a batch is a function of (seed, step), not of the ranks reading it."""
    from test_parallel import assert_same_losses, ranks

    stream = np.random.default_rng(0).integers(0, 256, 6000)
    for i, (a, b) in enumerate([(0, 2500), (2500, 5000)]):
        llmc_shard(tmp_path / "data" / f"d_train_{i:06d}.bin", stream[a:b])
    llmc_shard(tmp_path / "data" / "d_val_000000.bin", stream[5000:])
    run = [*TINY, f"task.data.path={tmp_path / 'data'}", "task.tokenizer=bytes", "train.steps=12",
           "model.dropout=0", "precision=fp32", "progress=false"]
    whole = run_txtrain(*run, f"hydra.run.dir={tmp_path / 'whole'}", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    sharded = ranks("parallel=fsdp", *run, "train.save_every=6", f"hydra.run.dir={tmp_path / 'fsdp'}",
                    cwd=tmp_path)
    assert sharded.returncode == 0, sharded.stderr[-2000:]
    reference = losses(tmp_path / "whole")
    assert_same_losses(tmp_path / "fsdp", reference, 1e-4, range(1, 13))
    resumed = run_txtrain(*run, f"resume={tmp_path / 'fsdp' / 'checkpoints' / 'step_000006'}",
                          f"hydra.run.dir={tmp_path / 'resumed'}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_losses(tmp_path / "resumed", reference, 1e-4, range(7, 13))


def test_the_gpt2_124m_recipe_is_half_a_million_tokens_a_step_of_gpt2_small():
    from conftest import make_config

    cfg = make_config("experiment=gpt2-124m", "task.data.path=data/web")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.dropout) == (12, 12, 768, 0.0)
    assert cfg.train.batch_size * cfg.task.seq_len == 524_288 and cfg.task.tokenizer == "gpt2"
    assert (cfg.optim.lr, cfg.optim.beta2, cfg.optim.weight_decay) == (6e-4, 0.95, 0.1)
    assert (cfg.schedule.warmup_steps, cfg.train.steps, cfg.schedule.min_lr_ratio) == (715, 19073, 0.1)
    assert cfg.precision.name == "bf16"
