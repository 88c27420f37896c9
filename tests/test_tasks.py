import pytest
import torch
import torch.nn.functional as F

from txtrain.config import ConfigError, SyntheticTaskConfig
from txtrain.tasks import IGNORE_INDEX, build_task
from txtrain.tasks.base import PAD, collate
from txtrain.tasks.synthetic import EOS, FIRST_SYMBOL, SEP


def task(name="reverse", seed=0, **overrides):
    return build_task(SyntheticTaskConfig(name=name, **overrides), seed)


def symbols(*values):
    return [FIRST_SYMBOL + v for v in values]


def test_reverse_example_scores_only_the_answer():
    inputs, targets = task("reverse").example(symbols(1, 2, 3, 4) + [SEP])
    assert inputs == symbols(1, 2, 3, 4) + [SEP] + symbols(4, 3, 2, 1)
    assert targets == [IGNORE_INDEX] * 4 + symbols(4, 3, 2, 1) + [EOS]


def test_copy_example():
    inputs, targets = task("copy").example(symbols(5, 0, 7) + [SEP])
    assert inputs == symbols(5, 0, 7) + [SEP] + symbols(5, 0, 7)
    assert targets == [IGNORE_INDEX] * 3 + symbols(5, 0, 7) + [EOS]


def decode_numbers(fib, tokens):
    """Terms of a fibonacci answer, back as integers."""
    terms, current = [], []
    for t in tokens:
        if t in (fib.comma, EOS):
            terms.append(fib.read_number(current))
            current = []
        else:
            current.append(t)
    return terms


@pytest.mark.parametrize("lsb_first", [True, False])
def test_fibonacci_continues_the_sequence_modulo_the_bound(lsb_first):
    fib = task("fibonacci", modulus=100, lsb_first=lsb_first)
    prompt = symbols(4) + [fib.semicolon] + fib.number(55) + [fib.comma] + fib.number(89) + [SEP]
    answer = fib.answer(prompt)
    assert decode_numbers(fib, answer) == [44, 33, 77, 10]  # 144, 233, 377, 610 mod 100
    assert answer[-1] == EOS
    assert fib.number(7) == (symbols(7, 0) if lsb_first else symbols(0, 7))


def test_fibonacci_prompts_state_the_number_of_terms():
    fib = task("fibonacci", min_len=2, max_len=5)
    batch = fib.train_batch(0, 32)
    for inputs, targets in zip(batch.inputs.tolist(), batch.targets.tolist()):
        answer = [t for t in targets if t != IGNORE_INDEX]
        count = int("".join(str(t - FIRST_SYMBOL) for t in inputs[: inputs.index(fib.semicolon)]))
        assert 2 <= count <= 5
        assert len(decode_numbers(fib, answer)) == count


def test_training_batches_are_a_function_of_seed_and_step():
    a, b = task(seed=3), task(seed=3)
    assert torch.equal(a.train_batch(7, 16).inputs, b.train_batch(7, 16).inputs)
    assert not torch.equal(a.train_batch(7, 16).inputs, a.train_batch(8, 16).inputs)
    assert not torch.equal(a.train_batch(7, 16).inputs, task(seed=4).train_batch(7, 16).inputs)


def test_held_out_set_is_fixed_distinct_and_never_trained_on():
    t = task("copy", min_len=1, max_len=4, n_symbols=4, n_eval=100)
    assert t.held_out == task("copy", seed=99, min_len=1, max_len=4, n_symbols=4, n_eval=100).held_out
    held_out = {tuple(p) for p in t.held_out}
    assert len(held_out) == 100
    seen = set()
    for step in range(200):
        batch = t.train_batch(step, 64)
        for row, targets in zip(batch.inputs.tolist(), batch.targets.tolist()):
            seen.add(tuple(row[: row.index(SEP) + 1]))
    assert not seen & held_out
    assert len(seen) > 100  # training still covers the rest of the space


def test_held_out_larger_than_half_the_prompt_space_is_refused():
    with pytest.raises(ConfigError, match="n_eval"):
        task("copy", min_len=1, max_len=2, n_symbols=3, n_eval=10)


def test_lengths_are_variable_and_padding_is_masked():
    batch = task(min_len=1, max_len=8).train_batch(0, 64)
    lengths = (batch.inputs != PAD).sum(dim=1)
    assert lengths.min() < lengths.max() == batch.inputs.shape[1]
    padded = batch.inputs == PAD
    assert (batch.targets[padded] == IGNORE_INDEX).all()


def test_collate_right_pads():
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([5], [9])])
    assert batch.inputs.tolist() == [[5, 6, 7], [5, PAD, PAD]]
    assert batch.targets.tolist() == [[-100, 6, 7], [9, -100, -100]]


def test_ignore_index_removes_prompt_positions_from_the_loss():
    batch = task().train_batch(0, 8)
    logits = torch.randn(*batch.targets.shape, 20, requires_grad=True)
    loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX)
    loss.backward()
    ignored = batch.targets == IGNORE_INDEX
    assert ignored.any() and (logits.grad[ignored] == 0).all()
    assert (logits.grad[~ignored].abs().sum(-1) > 0).all()
    changed = logits.detach().clone()
    changed[ignored] = torch.randn_like(changed[ignored]) * 100
    torch.testing.assert_close(
        F.cross_entropy(changed.flatten(0, 1), batch.targets.flatten(), ignore_index=IGNORE_INDEX), loss.detach())


def oracle(t, wrong_every=0):
    """A 'model' that predicts the next token perfectly, except every n-th held-out row."""
    rows = {}
    for prompt in t.held_out:
        inputs, targets = t.example(prompt)
        rows[tuple(inputs)] = targets

    def forward(inputs):
        logits = torch.zeros(*inputs.shape, t.vocab_size)
        for r, row in enumerate(inputs.tolist()):
            key = tuple(token for token in row if token != PAD)  # padding only ever trails
            for i, target in enumerate(rows[key]):
                if target != IGNORE_INDEX:
                    bad = wrong_every and sum(key) % wrong_every == 0 and target != EOS
                    logits[r, i, (target + 1) % t.vocab_size if bad else target] = 10.0
        return logits

    return forward


def test_exact_match_counts_whole_answers():
    t = task("reverse", min_len=2, max_len=6, n_eval=200)
    assert t.evaluate(oracle(t), batch_size=64)["exact_match"] == 1.0
    partial = t.evaluate(oracle(t, wrong_every=3), batch_size=64)["exact_match"]
    assert 0.4 < partial < 0.9
