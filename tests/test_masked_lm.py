"""Masked-language modelling with model.arch=encoder: the masks BERT draws, an encoder that
attends both ways and ignores padding, learning, and every data-parallel layout reproducing one
process."""

import ast
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import forked
from conftest import losses, run_ranks, run_txtrain
from test_text import GPT2_RANKS, needs_gpt2_ranks
from txtrain.config import ConfigError, CorpusConfig, ModelConfig, TextTaskConfig
from txtrain.model import Encoder
from txtrain.sample import shown
from txtrain.tasks import IGNORE_INDEX, build_task
from txtrain.tasks.masked import MaskedTextTask
from txtrain.tasks.tokenizers import (ByteTokenizer, CharTokenizer, MaskedTokenizer, TiktokenTokenizer,
                                      from_state)

DIALOGUE = "SOCRATES: What is virtue, Meno?\nMENO: I do not know.\n" * 60


def corpus(root: Path) -> Path:
    (root / "corpus").mkdir(parents=True, exist_ok=True)
    (root / "corpus" / "a.txt").write_text(DIALOGUE)
    return root / "corpus"


def masked_task(tmp_path: Path, **fields) -> MaskedTextTask:
    cfg = TextTaskConfig(data=CorpusConfig(path=str(corpus(tmp_path))), tokenizer="char",
                         cache_dir=str(tmp_path / "cache"), **fields)
    return build_task(cfg, seed=0, progress=False, model=Encoder)


# --- the masks ------------------------------------------------------------------------------------
def test_masks_choose_15_percent_and_corrupt_them_80_10_10(tmp_path):
    task = masked_task(tmp_path, seq_len=100)
    original = task.windows(task.train_tokens, np.arange(400) * 3).inputs
    batch = task.mask(original, np.random.default_rng(0))
    chosen = batch.targets != IGNORE_INDEX
    assert (chosen.sum(dim=1) == 15).all()  # 15% of every row's positions
    assert torch.equal(batch.targets[chosen], original[chosen])  # the loss asks for the originals
    assert torch.equal(batch.inputs[~chosen], original[~chosen])  # nothing else changes

    n = int(chosen.sum())  # 6000 chosen positions
    masked = batch.inputs[chosen] == task.codec.mask_id
    kept = batch.inputs[chosen] == original[chosen]
    replaced = ~masked & ~kept
    vocab = task.codec.mask_id  # random tokens come from the data's own vocabulary
    expected = {"masked": 0.8, "kept": 0.1 + 0.1 / vocab, "replaced": 0.1 * (vocab - 1) / vocab}
    for name, share in [("masked", masked), ("kept", kept), ("replaced", replaced)]:
        p = expected[name]
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(float(share.float().mean()) - p) < 4 * sigma, name
    assert int(batch.inputs[chosen][replaced].max()) < task.codec.mask_id


def test_batches_are_a_function_of_seed_and_step_and_validation_of_the_window(tmp_path):
    task = masked_task(tmp_path, seq_len=16)
    first, again, other = task.train_batch(3, 8), task.train_batch(3, 8), task.train_batch(4, 8)
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    assert not torch.equal(first.inputs, other.inputs)
    starts = task.val_starts()
    whole = task.validation_batch(starts)
    in_parts = [task.validation_batch(starts[i:i + 3]) for i in range(0, len(starts), 3)]
    assert torch.equal(whole.inputs, torch.cat([part.inputs for part in in_parts]))


def test_the_mask_token_extends_every_tokenizer_and_survives_a_checkpoint():
    for base in (ByteTokenizer(), CharTokenizer("abc ?")):
        codec = MaskedTokenizer(base)
        assert codec.vocab_size == base.vocab_size + 1
        ids = codec.encode("ab [MASK] c?[MASK]")
        assert ids.count(codec.mask_id) == 2 and codec.decode(ids) == "ab [MASK] c?[MASK]"
        assert from_state(codec.state()).encode("a[MASK]") == ids[:1] + [codec.mask_id]


@needs_gpt2_ranks
def test_a_gpt2_mask_takes_the_space_before_it_as_gpt2_words_do():
    base = TiktokenTokenizer("gpt2", str(GPT2_RANKS))
    codec = MaskedTokenizer(base)
    assert codec.mask_id == 50257 and codec.vocab_size == 50258
    assert codec.encode("What is [MASK]?") == base.encode("What is") + [50257] + base.encode("?")
    assert base.decode(base.encode(" justice")) == " justice"  # the token the mask stands for


# --- the encoder ------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["sdpa", "manual"])
def test_padding_never_changes_the_outputs_at_real_positions(impl):
    torch.manual_seed(0)
    model = Encoder(ModelConfig(n_layer=2, n_embd=32, n_head=4, impl=impl, pos="rope"), 50).eval()
    lengths = [5, 9, 12]
    rows = [torch.randint(0, 50, (n,)) for n in lengths]
    padded = torch.randint(0, 50, (3, 12))  # padding is any token: only the mask says what is real
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
    real = torch.arange(12)[None, :] < torch.tensor(lengths)[:, None]
    together = model(padded, padding_mask=real)
    for i, (row, n) in enumerate(zip(rows, lengths)):
        alone = model(row[None])
        torch.testing.assert_close(together[i, :n], alone[0], rtol=1e-5, atol=1e-5)


def test_the_encoder_reads_both_ways():
    torch.manual_seed(0)
    model = Encoder(ModelConfig(n_layer=1, n_embd=32, n_head=4), 50).eval()
    tokens = torch.randint(0, 50, (1, 8))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 50
    assert not torch.allclose(model(tokens)[0, 0], model(changed)[0, 0])  # the first sees the last


def test_the_encoder_is_refused_where_it_cannot_run(config):
    with pytest.raises(ConfigError, match="model.arch=encoder learns to fill masked tokens"):
        config("task=reverse", "model.arch=encoder")
    with pytest.raises(ConfigError, match="pipeline splits model.arch=gpt only; train model.arch=encoder"):
        config("task=text", "task.data.path=x", "model.arch=encoder", "parallel=pipeline")


# --- training -------------------------------------------------------------------------------------
RUN = ["task=text", "task.tokenizer=char", "task.seq_len=32", "model=tiny", "model.arch=encoder",
       "model.max_seq_len=32", "model.dropout=0", "train.batch_size=32", "optim.lr=3e-3",
       "precision=fp32", "progress=false"]


def evaluations(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mlm")
    result = run_txtrain(*RUN, f"task.data.path={corpus(root)}", f"task.cache_dir={root / 'cache'}",
                         "task.val_fraction=0.2", "train.steps=100", "train.eval_every=50",
                         f"hydra.run.dir={root / 'run'}",
                         cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_masked_lm_learns_well_above_chance(mlm_run):
    evals = evaluations(mlm_run)
    assert [e["step"] for e in evals] == [50, 100]
    # Guessing the corpus's most frequent character is right this often at a chosen position.
    chance = Counter(DIALOGUE).most_common(1)[0][1] / len(DIALOGUE)
    assert evals[-1]["mlm_accuracy"] > 3 * chance, (chance, evals)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_txtrain_sample_fills_each_mask_with_its_likeliest_tokens(mlm_run):
    prompt = "SOCRATES: What is v[MASK]rtue, M[MASK]no?"
    result, = forked.run([mlm_run, "--prompt", prompt, "--fills", "3"], mlm_run,
                         command="txtrain-sample", timeout=120)
    assert result.returncode == 0, result.stderr
    filled, *masks = result.stdout.splitlines()
    assert [line.split(":")[0] for line in masks] == ["[MASK] 1", "[MASK] 2"]
    best = []
    for line in masks:  # three fills, likeliest first: [MASK] 1: 'i' 0.912 | 'e' 0.031 | ...
        fills = [option.rsplit(" ", 1) for option in line.split(": ", 1)[1].split(" | ")]
        probabilities = [float(p) for _, p in fills]
        assert len(probabilities) == 3 and probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1
        best.append(shown(ast.literal_eval(fills[0][0])))
    assert filled == f"SOCRATES: What is v[{best[0]}]rtue, M[{best[1]}]no?"  # the likeliest, in place
    no_mask, = forked.run([mlm_run, "--prompt", "SOCRATES:"], mlm_run, command="txtrain-sample",
                          timeout=120)
    assert no_mask.returncode == 2
    assert no_mask.stderr.splitlines()[-1].startswith("error: this checkpoint is an encoder")


@pytest.fixture(scope="module")
def parity_runs(tmp_path_factory):
    """One process, and ddp and fsdp on two ranks, 8 steps of the encoder each."""
    root = tmp_path_factory.mktemp("mlm-parity")
    common = [*RUN, f"task.data.path={corpus(root)}", f"task.cache_dir={root / 'cache'}",
              "train.steps=8", "train.log_every=1", "train.eval_every=4", "model.vocab_multiple=7"]
    runs = {}
    for name, overrides, nproc in [("none", [], 1), ("ddp", ["parallel=ddp", "train.micro_batch_size=8"], 2),
                                   ("fsdp", ["parallel=fsdp"], 2)]:
        run_dir = root / name
        launch = run_txtrain if nproc == 1 else run_ranks
        result = launch(*overrides, *common, f"hydra.run.dir={run_dir}", cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = run_dir
    return runs


@pytest.mark.parametrize("name", ["ddp", "fsdp"])
def test_data_parallel_encoders_reproduce_one_process(name, parity_runs):
    reference, got = losses(parity_runs["none"]), losses(parity_runs[name])
    assert sorted(got) == list(range(1, 9))
    worst = max(abs(got[s] - reference[s]) / reference[s] for s in reference)
    assert worst < 1e-4, f"max relative loss difference {worst:.2e}"
    for mine, theirs in zip(evaluations(parity_runs[name]), evaluations(parity_runs["none"])):
        assert mine["val_loss"] == pytest.approx(theirs["val_loss"], rel=1e-4)
        assert mine["mlm_accuracy"] == pytest.approx(theirs["mlm_accuracy"], abs=0.002)
