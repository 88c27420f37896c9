"""The head and cross-entropy in chunks (model/chunked_loss.py) against the plain computation
(F.cross_entropy on the whole logits): the loss and the gradients of the hidden states and
the weight, with label smoothing, ignored targets, a padded vocabulary, a tied weight, chunks
that do not divide the tokens; and through the models' forward and a training step."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from txtrain.config import ModelConfig
from txtrain.model import build_model
from txtrain.model.chunked_loss import IGNORE_INDEX, TokenLoss
from txtrain.tasks import IGNORE_INDEX as TASKS_IGNORE_INDEX


def plain(hidden, weight, targets, vocab, smoothing):
    logits = (hidden @ weight.T)[:, :vocab]
    logits = logits if logits.dtype == torch.float64 else logits.float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum",
                           label_smoothing=smoothing)


def case(n=37, width=16, vocab=53, padded=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, width, generator=g, dtype=dtype)
    weight = torch.randn(padded, width, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, targets


def grads(fn, hidden, weight, targets):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fn(hidden, weight, targets)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def test_the_same_ignore_index_as_the_tasks():
    assert IGNORE_INDEX == TASKS_IGNORE_INDEX


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 7, 37, 1000])
def test_chunked_equals_plain_forward_and_backward(smoothing, chunk):
    vocab = 53
    hidden, weight, targets = case(dtype=torch.float32)
    ours = grads(lambda h, w, t: TokenLoss(smoothing, chunk)(h, w, t, vocab), hidden, weight, targets)
    theirs = grads(lambda h, w, t: plain(h, w, t, vocab, smoothing), hidden.double(), weight.double(), targets)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-6, atol=1e-6)
    assert (ours[2][vocab:] == 0).all()  # the padded rows: never in the loss


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_fp32_against_torchs_fp32(smoothing):
    hidden, weight, targets = case(n=50, vocab=53, dtype=torch.float32, seed=3)
    ours = grads(lambda h, w, t: TokenLoss(smoothing, 16, divide_by=40)(h, w, t, 53), hidden, weight, targets)
    theirs = grads(lambda h, w, t: plain(h, w, t, 53, smoothing) / 40, hidden, weight, targets)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


class MatmulCount(TorchDispatchMode):
    """How many matrix products run inside it."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        return func(*args, **(kwargs or {}))


def test_the_head_costs_three_matmuls_a_chunk_and_backward_recomputes_none():
    hidden, weight, targets = case(n=40, dtype=torch.float32)
    hidden.requires_grad_(), weight.requires_grad_()
    loss_fn = TokenLoss(chunk_tokens=16, skip_ignored=False)  # 3 chunks: 16 + 16 + 8 tokens
    with MatmulCount() as forward:
        loss = loss_fn(hidden, weight, targets, 53)
    with MatmulCount() as backward:
        loss.backward()
    assert (forward.count, backward.count) == (3 * 3, 0)  # logits, and both gradients, per chunk


class ChunkPasses(TorchDispatchMode):
    """The ops that pass over a whole (chunk x V) tensor, other than the matmuls, views, and
    the one-element-a-row gather and scatter of the targets."""

    def __init__(self, size: int):
        super().__init__()
        self.size, self.names = size, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        wide = any(isinstance(t, torch.Tensor) and t.numel() >= self.size for t in tree_leaves((args, kwargs)))
        if wide and name not in ("mm", "addmm", "addmm_", "gather", "scatter_add_", "slice", "t", "permute"):
            self.names.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_chunks_logits_are_passed_over_twice_for_loss_and_softmax(dtype):
    """A fused log-softmax (max, exp-sum and shift a row at a time, from the compute dtype)
    gives the loss, and one exp turns it into the softmax; under bf16 one copy back for the
    gradient matmuls. Before: an fp32 copy, then a max, shift, exp, sum and divide."""
    hidden, weight, targets = case(n=40, width=4, dtype=torch.float32)
    hidden.requires_grad_(), weight.requires_grad_()
    with ChunkPasses(8 * 53) as passes, torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        TokenLoss(chunk_tokens=16, skip_ignored=False)(hidden, weight, targets, 53)  # 3 chunks
    per_chunk = ["log_softmax", "exp_"] + ([] if dtype == torch.float32 else ["copy_"])
    assert passes.names == per_chunk * 3


def test_a_log_softmax_written_into_its_own_input_is_the_one_written_elsewhere():
    """The fp32 path takes each chunk's log-probabilities in place of its logits."""
    logits = torch.randn(16, 50257, generator=torch.Generator().manual_seed(0)) * 30
    elsewhere = torch.log_softmax(logits, -1)
    assert torch.equal(torch.log_softmax(logits, -1, out=logits), elsewhere)


class NewTensors(TorchDispatchMode):
    """The sizes of the tensors made inside it: not an in-place result nor a view."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.sizes += [t.numel() for t in tree_leaves(out)
                       if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given]
        return out


def test_backward_hands_on_the_heads_gradient_without_a_copy():
    """The head's (V x C) gradient is made in forward; backward scales it in place. A copy, at
    the start of backward, when every activation is still held, would add its size to the
    step's peak. A second backward through it is refused, not wrong."""
    hidden, weight, targets = case(n=40, dtype=torch.float32)
    hidden.requires_grad_(), weight.requires_grad_()
    loss = TokenLoss(chunk_tokens=16, divide_by=7.0)(hidden, weight, targets, 53)
    with NewTensors() as made:
        (3 * loss).backward()
    assert max(made.sizes) < weight.numel()
    expected = grads(lambda h, w, t: 3 * plain(h, w, t, 53, 0.0) / 7, hidden.detach(), weight.detach(), targets)
    torch.testing.assert_close(weight.grad, expected[2], rtol=1e-5, atol=1e-6)
    loss = TokenLoss(chunk_tokens=16)(hidden, weight, targets, 53)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_every_chunks_logits_go_into_one_buffer():
    """A new (chunk x V) tensor per chunk does not reuse the last one's memory on a CPU (small
    tensors made in between split the freed block): the heap grew by a chunk's logits per chunk."""
    hidden, weight, targets = case(n=40, width=4, dtype=torch.float32)
    hidden.requires_grad_(), weight.requires_grad_()
    for dtype in (torch.float32, torch.bfloat16):  # the products, and their fp32 log-probabilities
        with NewTensors() as made, torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            TokenLoss(chunk_tokens=16, skip_ignored=False)(hidden, weight, targets, 53)  # 3 chunks
        assert sum(size >= 16 * 53 for size in made.sizes) == (1 if dtype == torch.float32 else 2)


def test_every_target_ignored_gives_zero():
    hidden, weight, targets = case()
    targets[:] = IGNORE_INDEX
    loss, grad_h, grad_w = grads(lambda h, w, t: TokenLoss(0.1, 8)(h, w, t, 53), hidden, weight, targets)
    assert loss == 0 and (grad_h == 0).all() and (grad_w == 0).all()


def test_evaluation_loss_and_hits_match_the_logits():
    hidden, weight, targets = case(dtype=torch.float32)
    with torch.no_grad():
        loss, hits = TokenLoss(chunk_tokens=8, hits=True)(hidden, weight, targets, 53)
        logits = (hidden @ weight.T)[:, :53]
        expected = TokenLoss(chunk_tokens=0, hits=True).from_logits(logits, targets)
    torch.testing.assert_close(loss, expected[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(hits, expected[1])


def test_bf16_autocast_close_to_the_plain_path():
    hidden, weight, targets = case(n=64, width=32, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = grads(lambda h, w, t: TokenLoss(0.1, 10)(h, w, t, 53), hidden, weight, targets)
        theirs = grads(lambda h, w, t: TokenLoss(0.1, 0)(h, w, t, 53), hidden, weight, targets)
    for a, b in zip(ours, theirs):  # within bf16's rounding (an ulp: 1/128 of the scale)
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=2e-2, atol=float(1e-2 * b.abs().max()))


@pytest.mark.parametrize("arch", ["gpt", "encoder"])
@pytest.mark.parametrize("tied", [True, False])
def test_model_loss_equals_logits_loss(arch, tied):
    """Through a whole model (a padded, optionally tied head): forward's loss and every
    parameter's gradient, chunked against the plain path."""
    cfg = ModelConfig(arch=arch, n_layer=1, n_head=2, n_embd=16, max_seq_len=12, vocab_multiple=64,
                      tie_embeddings=tied, dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, 50)
    idx = torch.randint(0, 50, (3, 12))
    targets = torch.randint(0, 50, (3, 12))
    targets[0, :4] = IGNORE_INDEX
    results = []
    for chunk in (0, 5):
        model.zero_grad()
        loss = model(idx, targets=targets, loss=TokenLoss(0.1, chunk, divide_by=30))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results
    torch.testing.assert_close(chunked_loss, plain_loss, rtol=1e-6, atol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    head = chunked_grads["token_embedding.weight" if tied else "head.weight"]
    assert (head[50:] == 0).all()  # padded rows: neither looked up nor in the loss


# --- every strategy, through the command line ------------------------------------------------
# One process on the plain path (whole logits) is the reference; each strategy runs the chunked
# loss with chunks (7 tokens) that divide neither a micro-batch nor a sequence, a tied and
# padded head (13 symbols in 15 rows), label smoothing and ignored prompt targets.
RUN = ["train.steps=4", "train.log_every=1", "train.save_every=0", "train.eval_every=4",
       "task.n_eval=20", "model.n_layer=2", "model.n_embd=32", "model.tie_embeddings=true",
       "model.vocab_multiple=5", "model.dropout=0", "precision=fp32", "progress=false",
       "train.label_smoothing=0.1", "train.batch_size=16"]
PARALLEL = {"ddp": ["parallel=ddp", "train.micro_batch_size=4"],
            "fsdp": ["parallel=fsdp", "train.micro_batch_size=4"],
            "pipeline": ["parallel=pipeline", "parallel.schedule=1f1b"]}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    from conftest import run_txtrain

    run_dir = tmp_path_factory.mktemp("plain") / "run"
    result = run_txtrain(*RUN, "train.loss_chunk_tokens=0", f"hydra.run.dir={run_dir}", cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("strategy", list(PARALLEL))
def test_strategies_with_the_chunked_loss_match_one_plain_process(strategy, plain_run, tmp_path):
    import json

    from conftest import losses, run_ranks

    run_dir = tmp_path / "run"
    result = run_ranks(*PARALLEL[strategy], *RUN, "train.loss_chunk_tokens=7",
                       f"hydra.run.dir={run_dir}", nproc=2, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    expected, got = losses(plain_run), losses(run_dir)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4]
    for step in expected:  # 4 updates on: the gradients (head, tied embedding) agreed too
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step

    def evaluation(path):
        return json.loads((path / "eval.jsonl").read_text().splitlines()[-1])

    assert evaluation(run_dir)["eval_loss"] == pytest.approx(evaluation(plain_run)["eval_loss"], rel=1e-4)
    assert evaluation(run_dir)["exact_match"] == evaluation(plain_run)["exact_match"]
