"""The key/value cache (model/attention.py's KVCache, generate.py's Cached): cached steps give
the logits of one pass, sampling draws the same tokens with the cache as without (every
position scheme, both architectures, past the context too), txtrain-sample answers with an
encoder-decoder, and the speed script runs at its smallest."""

import runpy
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_config
from test_sample import run_sample
from txtrain.config import ModelConfig
from txtrain.generate import (Cached, ModelLogits, Window, draw_tokens, greedy_decode, stepper,
                              takes_cache)
from txtrain.model import build_model
from txtrain.model.attention import KVCache
from txtrain.parallel.base import SingleDevice
from txtrain.train import Trainer

VOCAB = 23
CONTEXT = 24  # max_seq_len: the sampling tests draw past it
PROMPT = [3, 8, 5, 5, 11]
SOURCE = torch.tensor([[5, 9, 4, 12, 7, 1, 0, 0]])  # right-padded: the mask matters too
POSITIONS = ["learned", "sinusoidal", "rope", "none"]
ARCHS = ["gpt", "encoder_decoder"]
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sample_speed.py"


def build(arch: str = "gpt", **fields):
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=2, n_embd=32, max_seq_len=CONTEXT, **fields)
    torch.manual_seed(0)
    return build_model(cfg, VOCAB).eval()


def sources_for(arch: str, rows: int = 1) -> tuple[torch.Tensor, ...]:
    return () if arch == "gpt" else (SOURCE.repeat(rows, 1),)


# --- the model with a cache ---------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["manual", "sdpa"])
@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("arch", ARCHS)
@torch.no_grad()
def test_cached_steps_give_the_logits_of_one_pass(arch, pos, impl):
    model = build(arch, pos=pos, impl=impl)
    ids = torch.randint(0, VOCAB, (2, CONTEXT), generator=torch.Generator().manual_seed(1))
    sources = sources_for(arch, rows=2)
    cache, steps, start = KVCache(), [], 0
    for size in [5, 3] + [1] * (CONTEXT - 8):  # a prompt, a few tokens at once, then one by one
        steps.append(model(ids[:, start:start + size], *sources, cache=cache))
        start += size
    assert cache.length == CONTEXT
    assert torch.allclose(torch.cat(steps, dim=1), model(ids, *sources), atol=1e-5)


# --- sampling -----------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature, top_k", [(0.0, None), (1.0, 5)])
@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_sampling_draws_the_same_tokens_with_and_without_the_cache(arch, pos, temperature, top_k):
    model = build(arch, pos=pos)
    sources = None if arch == "gpt" else SOURCE

    def draw(with_cache: bool) -> list[int]:
        next_logits = ModelLogits(model, "cpu", sources, with_cache=with_cache)
        return draw_tokens(next_logits, PROMPT, 40, temperature, top_k,
                           torch.Generator().manual_seed(0), context=CONTEXT)

    cached = draw(with_cache=True)
    assert cached == draw(with_cache=False)
    if temperature > 0:  # varied tokens, a real comparison (greedy, an untrained model repeats itself)
        assert len(set(cached)) > 3


@pytest.mark.parametrize("pos", POSITIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_the_cached_stepper_gives_the_windows_logits_past_the_context(arch, pos):
    model = build(arch, pos=pos)
    sources = None if arch == "gpt" else SOURCE
    cached = stepper(ModelLogits(model, "cpu", sources, with_cache=True), CONTEXT)
    window = stepper(ModelLogits(model, "cpu", sources, with_cache=False), CONTEXT)
    assert isinstance(cached, Cached) and type(window) is Window
    tokens = torch.randint(0, VOCAB, (CONTEXT + 10,), generator=torch.Generator().manual_seed(3)).tolist()
    feeds = [PROMPT] + [[token] for token in tokens]  # the last 11 slide the window
    with torch.no_grad():
        for feed in feeds:
            assert torch.allclose(cached(feed), window(feed), atol=1e-5)
    assert cached.cache is None  # it fell back to the window


def test_the_cache_runs_a_position_per_token_until_the_window_slides():
    lengths = []

    class Counting(ModelLogits):
        def __call__(self, inputs, cache=None):
            lengths.append(inputs.shape[1])
            return super().__call__(inputs, cache)

    new_tokens = 30
    draw_tokens(Counting(build(), "cpu", with_cache=True), PROMPT, new_tokens, 0.0, context=CONTEXT)
    cached_steps = CONTEXT - len(PROMPT)  # until the sequence fills the context
    assert lengths == [len(PROMPT)] + [1] * cached_steps + [CONTEXT] * (new_tokens - 1 - cached_steps)


def test_the_strategy_samples_with_a_cache_only_where_the_model_takes_one():
    strategy = SingleDevice(make_config().parallel, "cpu")
    assert isinstance(strategy.generate(build(), lambda next_logits: stepper(next_logits)), Cached)
    plain = torch.nn.Linear(4, 4)  # any module without a cache argument
    assert type(strategy.generate(plain, lambda next_logits: stepper(next_logits))) is Window
    assert takes_cache(torch.nn.DataParallel(build())) and not takes_cache(plain)  # through wrappers


@torch.no_grad()
def test_greedy_decode_with_the_cache_equals_rerunning_the_sequence():
    model = build(pos="rope")
    prompts = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(2))
    cached = greedy_decode(model, prompts, 12)
    assert torch.equal(cached, greedy_decode(lambda idx: model(idx), prompts, 12))  # no cache


# --- txtrain-sample with an encoder-decoder -----------------------------------------------------
@pytest.fixture(scope="module")
def reverse_seq2seq(tmp_path_factory) -> Path:
    """The encoder-decoder trained on reverse, 3 to 5 symbols: exact after 150 steps (1.0 on
    its held-out set; the right token's probability about 0.97 at each position of the
    prompts below), in about 4 seconds."""
    run = tmp_path_factory.mktemp("reverse-seq2seq")
    summary = Trainer(make_config(
        "experiment=transformer", "model=transformer-tiny", "model.n_embd=32", "model.d_ff=64",
        "model.norm=pre", "model.pos=learned", "model.max_seq_len=8", "schedule=cosine",
        "schedule.warmup_steps=10", "optim.lr=5e-3", "train.label_smoothing=0", "train.steps=150",
        "train.eval_every=0", "train.log_every=100", "task.min_len=3", "task.max_len=5",
        "task.n_eval=20"), run).fit()
    assert summary["exact_match"] == 1.0, summary
    return run


@pytest.mark.parametrize("cache", [[], ["--no-cache"]])
def test_txtrain_sample_prints_an_encoder_decoders_answer(reverse_seq2seq, capsys, cache):
    status, out, err = run_sample(capsys, str(reverse_seq2seq), "--prompt", "3 1 4 1 5",
                                  "--temperature", "0", *cache)
    assert status == 0, err
    assert out == "3 1 4 1 5 -> 5 1 4 1 3\n"


def test_a_source_symbol_outside_the_task_is_a_one_line_error(reverse_seq2seq, capsys):
    status, out, err = run_sample(capsys, str(reverse_seq2seq), "--prompt", "3 1 12")
    assert status == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: a reverse prompt is symbols 0..9")


# --- scripts/sample_speed.py --------------------------------------------------------------------
def test_sample_speed_script_prints_a_row_per_context(monkeypatch, capsys):
    args = ["--new-tokens", "12", "--prompt-tokens", "4", "--contexts", "8", "32", "--layers", "1",
            "--heads", "2", "--width", "16", "--vocab", "50", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in lines
            if line.startswith("| ") and "context" not in line]
    assert [(row[0], row[1], row[-1]) for row in rows] == [("8", "5 of 12", "yes"), ("32", "12 of 12", "yes")]
