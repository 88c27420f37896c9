"""The text task: tokenizers, the token cache, windows and splits, learning, sampling, errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import forked
from conftest import SHARED, make_config, run_txtrain
from txtrain.config import ConfigError, CorpusConfig, TextTaskConfig
from txtrain.generate import draw_tokens
from txtrain.tasks import token_cache
from txtrain.tasks.corpus import find_corpus, file_sha256
from txtrain.tasks.text import TextTask
from txtrain.tasks.tokenizers import TiktokenTokenizer, build_tokenizer, from_state

GPT2_RANKS = SHARED / "tiktoken" / "gpt2.tiktoken"
SOCRATES = SHARED / "data" / "socrates"
needs_gpt2_ranks = pytest.mark.skipif(not GPT2_RANKS.is_file(),
                                      reason=f"GPT-2 ranks not found at {GPT2_RANKS}")
TEXT = "SOCRATES: And what is justice, Meno? Ἀθῆναι, café…\n\nMENO: I cannot say.\n"


def task_config(tmp_path: Path, corpus: Path, **fields) -> TextTaskConfig:
    fields = {"tokenizer": "char", "seq_len": 8, "cache_dir": str(tmp_path / "cache"), **fields}
    return TextTaskConfig(data=CorpusConfig(path=str(corpus)), **fields)


def everything(stream) -> np.ndarray:
    return stream.read(0, len(stream))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- tokenizers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["bytes", "char"])
def test_simple_tokenizers_round_trip(name):
    tokenizer = build_tokenizer(name, corpus_text=TEXT)
    ids = tokenizer.encode(TEXT)
    assert tokenizer.decode(ids) == TEXT
    assert max(ids) < tokenizer.vocab_size
    rebuilt = from_state(json.loads(json.dumps(tokenizer.state())))
    assert rebuilt.encode(TEXT) == ids


def test_char_vocabulary_is_the_corpus_characters():
    tokenizer = build_tokenizer("char", corpus_text="abcab")
    assert tokenizer.vocab_size == 3
    with pytest.raises(ConfigError, match="'z'"):
        tokenizer.encode("az")


@needs_gpt2_ranks
def test_gpt2_from_the_local_ranks_file_round_trips():
    tokenizer = TiktokenTokenizer("gpt2", str(GPT2_RANKS))
    assert tokenizer.vocab_size == 50257 and tokenizer.end_of_text == 50256
    assert tokenizer.encode("Hello world") == [15496, 995]  # GPT-2's published ids
    assert tokenizer.decode(tokenizer.encode(TEXT)) == TEXT


def test_unknown_tokenizer_and_bad_ranks_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a tokenizer"):
        build_tokenizer("gpt7")
    with pytest.raises(ConfigError, match="no such file"):
        build_tokenizer("gpt2", str(tmp_path / "missing.tiktoken"))
    corrupt = write(tmp_path / "corrupt.tiktoken", "this is not base64 ranks\n")
    with pytest.raises(ConfigError, match="not a .tiktoken ranks file|ranks, not GPT-2's"):
        build_tokenizer("gpt2", str(corrupt))


# --- the corpus and its token cache -------------------------------------------------------------
def test_tokens_are_cached_reused_and_rebuilt_when_the_corpus_changes(tmp_path, monkeypatch):
    corpus = write(tmp_path / "corpus" / "a.txt", TEXT * 20)
    write(tmp_path / "corpus" / "sub" / "b.txt", "Another dialogue.\n" * 20)
    builds = []
    real_build = token_cache.build_entry
    monkeypatch.setattr(token_cache, "build_entry", lambda *a: builds.append(1) or real_build(*a))
    cfg = task_config(tmp_path, corpus.parent)

    first = TextTask(cfg, seed=0, progress=False)
    assert len(builds) == 1 and len(list((tmp_path / "cache" / "tokens").glob("*/dataset.json"))) == 1
    second = TextTask(cfg, seed=0, progress=False)
    assert len(builds) == 1, "an unchanged corpus must reuse its cached tokens"
    assert np.array_equal(everything(first.train_tokens), everything(second.train_tokens))
    assert [shard.dtype for shard in second.train_tokens.shards] == [np.uint16]

    write(tmp_path / "corpus" / "sub" / "b.txt", "A changed dialogue.\n" * 20)
    TextTask(cfg, seed=0, progress=False)
    assert len(builds) == 2, "a changed corpus must be tokenized again"


def test_the_token_stream_is_the_files_in_order(tmp_path):
    write(tmp_path / "corpus" / "1.txt", "first file\n")
    write(tmp_path / "corpus" / "2.txt", "second file\n" * 10)
    task = TextTask(task_config(tmp_path, tmp_path / "corpus", tokenizer="bytes"), 0, progress=False)
    stream = np.concatenate([everything(task.train_tokens), everything(task.val_tokens)])
    assert bytes(stream.tolist()).decode() == "first file\n\n\n" + "second file\n" * 10 + "\n\n"


def test_windows_are_contiguous_and_targets_are_shifted_by_one(tmp_path):
    corpus = write(tmp_path / "c.txt", "".join(chr(ord("a") + i % 26) for i in range(5000)))
    task = TextTask(task_config(tmp_path, corpus), seed=3, progress=False)
    batch = task.train_batch(step=7, batch_size=32)
    assert batch.inputs.shape == batch.targets.shape == (32, 8)
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    # Every window is a slice of the training tokens: consecutive letters of the alphabet.
    assert torch.all((batch.targets - batch.inputs) % 26 == 1)
    assert torch.equal(task.train_batch(7, 32).inputs, batch.inputs)  # a function of seed and step
    assert not torch.equal(task.train_batch(8, 32).inputs, batch.inputs)


def test_validation_is_held_out_from_the_end_of_the_corpus(tmp_path):
    # Letters for the first 95%, digits for the last 5%: the split must fall exactly between.
    corpus = write(tmp_path / "c.txt", "ab" * 950 + "0123456789" * 10)
    task = TextTask(task_config(tmp_path, corpus, val_fraction=0.05), seed=0, progress=False)
    digits = {task.codec.encode(d)[0] for d in "0123456789"}
    for step in range(50):
        assert not digits & set(task.train_batch(step, 16).inputs.flatten().tolist())
    seen = []
    task.evaluate(lambda inputs: seen.append(inputs) or torch.zeros(*inputs.shape, task.vocab_size), 4)
    assert set(torch.cat(seen).flatten().tolist()) <= digits
    assert len(task.train_tokens) + len(task.val_tokens) == 2000


def test_perplexity_is_the_exponential_of_the_validation_loss(tmp_path):
    corpus = write(tmp_path / "c.txt", TEXT * 30)
    task = TextTask(task_config(tmp_path, corpus), seed=0, progress=False)
    uniform = task.evaluate(lambda inputs: torch.zeros(*inputs.shape, task.vocab_size), 4)
    assert uniform["val_loss"] == pytest.approx(np.log(task.vocab_size))
    assert uniform["perplexity"] == pytest.approx(task.vocab_size)


def test_a_download_is_fetched_once_and_verified(tmp_path):
    source = write(tmp_path / "remote" / "dialogue.txt", TEXT * 10)
    url, digest = source.as_uri(), file_sha256(source)
    corpus = find_corpus(CorpusConfig(path=str(tmp_path / "absent"), url=url, sha256=digest),
                         str(tmp_path / "cache"))
    assert corpus.files[0].read_text() == TEXT * 10 and tmp_path / "cache" in corpus.files[0].parents
    source.unlink()  # the cached copy is used from now on
    assert find_corpus(CorpusConfig(url=url, sha256=digest), str(tmp_path / "cache")).files == corpus.files
    with pytest.raises(ConfigError, match="could not download"):
        find_corpus(CorpusConfig(url=(tmp_path / "gone.txt").as_uri()), str(tmp_path / "cache"))
    write(source, "tampered")
    with pytest.raises(ConfigError, match="sha256"):
        find_corpus(CorpusConfig(url=url, sha256=digest), str(tmp_path / "other-cache"))


# --- sampling -----------------------------------------------------------------------------------
def fixed_logits(values):
    logits = torch.tensor([values], dtype=torch.float)
    return lambda inputs: logits


def test_sampling_is_reproducible_with_a_seed_and_respects_top_k():
    next_logits = fixed_logits([3.0, 2.9, 2.8, 0.0, -1.0])

    def draw(seed, top_k):
        return draw_tokens(next_logits, [0], 300, temperature=1.0, top_k=top_k,
                           generator=torch.Generator().manual_seed(seed))

    assert draw(1, None) == draw(1, None)
    assert draw(1, None) != draw(2, None)
    assert set(draw(1, 2)) == {0, 1}
    assert set(draw(1, None)) >= {0, 1, 2, 3}
    assert draw_tokens(next_logits, [4], 5, temperature=0) == [0] * 5  # greedy
    assert draw_tokens(next_logits, [4], 5, temperature=0, stop=0) == []


def test_sampling_sees_at_most_the_context():
    seen = []
    draw_tokens(lambda inputs: seen.append(inputs.shape[1]) or torch.zeros(1, 3), [1] * 10, 4,
                context=6, generator=torch.Generator().manual_seed(0))
    assert seen == [6, 6, 6, 6]


# --- end to end ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_run(tmp_path_factory) -> Path:
    """A char-level model trained briefly on a small repetitive corpus."""
    root = tmp_path_factory.mktemp("text")
    write(root / "corpus" / "a.txt", "SOCRATES: What is virtue, Meno?\nMENO: I do not know.\n" * 60)
    result = run_txtrain("task=text", f"task.data.path={root / 'corpus'}", "task.tokenizer=char",
                         f"task.cache_dir={root / 'cache'}", "task.seq_len=32", "task.sample_tokens=40",
                         "task.prompts=[SOCRATES:]", "model.max_seq_len=48", "train.steps=120",
                         "train.eval_every=60", "optim.lr=3e-3", f"hydra.run.dir={root / 'run'}",
                         cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "run"


def test_text_training_lowers_the_validation_loss_and_writes_samples(text_run):
    evals = [json.loads(line) for line in (text_run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [60, 120]
    assert evals[-1]["val_loss"] < 0.5 * np.log(33)  # well below guessing among the characters
    assert evals[-1]["perplexity"] == pytest.approx(np.exp(evals[-1]["val_loss"]))
    samples = (text_run / "samples.txt").read_text()
    assert samples.count("=== step") == 2 and "SOCRATES:" in samples


def test_txtrain_sample_reproduces_the_run_samples(text_run):
    """40 new tokens after the prompt: the window slides at the 32 tokens the run trained on
    (the model's position table has 48)."""
    args = [text_run, "--prompt", "SOCRATES:", "--max-new-tokens", "40", "--temperature", "0.8",
            "--top-k", "40", "--seed", "0"]
    result, = forked.run(args, text_run, command="txtrain-sample", timeout=120)
    assert result.returncode == 0, result.stderr
    last_sample = (text_run / "samples.txt").read_text().split("--- prompt 'SOCRATES:' ---\n")[-1]
    assert result.stdout == last_sample


def test_txtrain_sample_refuses_what_the_tokenizer_cannot_read(text_run):
    result, = forked.run([text_run, "--prompt", "Ω"], text_run, command="txtrain-sample", timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error:")


@needs_gpt2_ranks
@pytest.mark.skipif(not SOCRATES.is_dir(), reason=f"the Socrates corpus is not at {SOCRATES}")
def test_socrates_experiment_composes_and_reads_the_dialogues(tmp_path):
    cfg = make_config("experiment=socrates", f"task.data.path={SOCRATES}",
                      f"task.tokenizer_file={GPT2_RANKS}", f"task.cache_dir={tmp_path}")
    task = TextTask(cfg.task, cfg.seed, progress=False)
    assert task.vocab_size == 50257 and "21 file(s)" in task.describe()
    assert 1_200_000 < len(task.train_tokens) + len(task.val_tokens) < 1_300_000
    assert task.codec.decode(task.train_batch(0, 1).inputs[0].tolist())  # decodes to text
