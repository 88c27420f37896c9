import dataclasses

import pytest
import torch

from torch import nn

from txtrain.config import ModelConfig, Pos
from txtrain.model import LanguageModel, Transformer, build_model, model_class
from txtrain.model.attention import MultiHeadAttention, causal_mask
from txtrain.parallel.stage import ModelSlice

VOCAB = 17
SCHEMES = ["learned", "sinusoidal", "rope", "none"]


def build(**overrides) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=32, max_seq_len=64, **overrides)
    return Transformer(cfg, VOCAB).eval()


def tokens(batch=3, length=12, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("pos", SCHEMES)
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_manual_and_sdpa_attention_agree(pos, norm):
    manual = build(pos=pos, norm=norm, impl="manual")
    fused = build(pos=pos, norm=norm, impl="sdpa")
    fused.load_state_dict(manual.state_dict())
    x = tokens()
    torch.testing.assert_close(fused(x), manual(x), atol=1e-5, rtol=1e-5)


def test_manual_and_sdpa_agree_with_padding_mask_and_cross_attention():
    torch.manual_seed(0)
    a = MultiHeadAttention(32, 4, impl="manual")
    b = MultiHeadAttention(32, 4, impl="sdpa")
    b.load_state_dict(a.state_dict())
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = torch.ones(2, 1, 1, 7, dtype=torch.bool)
    mask[0, ..., 4:] = False  # the first source is padded after 4 tokens
    torch.testing.assert_close(a(x, memory, causal=False, mask=mask),
                               b(x, memory, causal=False, mask=mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["manual", "sdpa"])
@pytest.mark.parametrize("pos", SCHEMES)
def test_future_tokens_never_change_earlier_outputs(impl, pos):
    model = build(pos=pos, impl=impl)
    x = tokens(length=16)
    changed = x.clone()
    changed[:, 9:] = (changed[:, 9:] + 1) % VOCAB
    before, after = model(x), model(changed)
    torch.testing.assert_close(before[:, :9], after[:, :9], atol=0, rtol=0)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_attention_is_scaled_by_sqrt_head_dim():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 4, 16).unbind(0)
    out = MultiHeadAttention.attend_manual(q, k, v, causal=False, mask=None, dropout=0.0)
    weights = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
    torch.testing.assert_close(out, weights @ v)


def test_causal_mask_is_lower_triangular():
    assert causal_mask(3, 3, torch.device("cpu")).tolist() == [
        [True, False, False], [True, True, False], [True, True, True]]


def test_rope_depends_only_on_relative_position():
    model = build(pos="rope")
    rotary = model.blocks["0"].attn.rotary
    torch.manual_seed(0)
    q, k = torch.randn(2, 1, 1, 1, 8).unbind(0)
    cos, sin = rotary.angles(20, torch.device("cpu"))

    def score(i, j):
        qi = rotary.rotate(q, cos[i:i + 1], sin[i:i + 1])
        kj = rotary.rotate(k, cos[j:j + 1], sin[j:j + 1])
        return (qi * kj).sum()

    torch.testing.assert_close(score(3, 1), score(13, 11))
    assert not torch.allclose(score(3, 1), score(3, 2))


def test_tied_embeddings_share_one_matrix_and_count_once():
    tied, untied = build(tie_embeddings=True), build(tie_embeddings=False)
    assert tied.head.weight is tied.token_embedding.weight
    rows = tied.token_embedding.num_embeddings
    assert untied.num_parameters() - tied.num_parameters() == rows * 32


def test_padded_vocabulary_never_reaches_the_logits():
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, max_seq_len=32, vocab_multiple=64)
    model = Transformer(cfg, vocab_size=13)
    assert model.token_embedding.num_embeddings == 64
    assert model(tokens(length=5) % 13).shape[-1] == 13
    unpadded = Transformer(dataclasses.replace(cfg, vocab_multiple=1), vocab_size=13)
    assert unpadded.token_embedding.num_embeddings == 13


def test_learned_positions_refuse_sequences_past_their_table():
    model = build(pos="learned")
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("pos", ["sinusoidal", "rope", "none"])
def test_other_schemes_accept_sequences_past_max_seq_len(pos):
    assert build(pos=pos)(torch.zeros(1, 80, dtype=torch.long)).shape == (1, 80, VOCAB)


@pytest.mark.parametrize("preset,expected", [("gpt2", 124_439_808), ("gpt2-xl", 1_557_611_200)])
def test_gpt2_presets_have_the_published_sizes(config, preset, expected):
    cfg = config(f"model={preset}", "model.vocab_multiple=1").model  # as published: 50257 rows
    with torch.device("meta"):
        model = Transformer(cfg, vocab_size=50257)
    assert model.num_parameters() == expected


def test_dropout_is_active_only_in_training():
    model = build(dropout=0.5).train()
    x = tokens()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("bad,message", [
    (dict(n_embd=30, n_head=4), "not divisible"),
    (dict(n_layer=0), "n_layer must be positive"),
    (dict(dropout=1.5), "dropout"),
    (dict(pos=Pos.rope, n_embd=12, n_head=4), "even head dimension"),
])
def test_impossible_model_values_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**bad)


@pytest.mark.parametrize("arch", ["gpt", "encoder_decoder"])
def test_both_architectures_keep_the_model_contract(arch):
    cfg = ModelConfig(arch=arch, n_layer=2, n_head=4, n_embd=32, vocab_multiple=8)
    model = build_model(cfg, VOCAB)
    assert isinstance(model, model_class(cfg)) and isinstance(model, LanguageModel)
    assert model_class(cfg).needs_sources == (arch == "encoder_decoder")
    assert isinstance(model.blocks, nn.ModuleDict) and model.cfg is cfg and model.vocab_size == VOCAB
    assert model.token_embedding.num_embeddings == model.head.out_features == 24
    assert isinstance(model.final_norm, nn.LayerNorm) and isinstance(model.dropout, nn.Dropout)
    inputs = (tokens(), tokens(length=5)) if model_class(cfg).needs_sources else (tokens(),)
    assert model(*inputs, last_only=True).shape == (3, VOCAB)


def test_pipeline_slices_keep_the_model_names_and_chained_give_its_logits():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(n_layer=3, n_head=4, n_embd=32, tie_embeddings=False), VOCAB).eval()
    first = ModelSlice(model, ["0"], first=True, last=False)
    last = ModelSlice(model, ["1", "2"], first=False, last=True)
    assert [*first.state_dict(), *last.state_dict()] == list(model.state_dict())
    assert first.token_embedding is model.token_embedding and last.head is model.head
    x = tokens()
    assert torch.equal(last.logits(last(first(x))), model(x))  # the last stage gives hidden states
