"""The memory planner: activation estimates against what autograd really saves, and
``plan=true`` on the command line. (Its parameter, gradient and optimizer bytes are checked
against the tensors each rank holds in test_parallel.py.)"""

import time

import pytest
import torch

from conftest import make_config, run_txtrain
from txtrain.model.positions import Rotary
from txtrain.model.transformer import Block
from txtrain.planner import Activations, Layout, meta_model, plan_memory, skip_initializers, what_fits


def saved_for_backward(block: Block, x: torch.Tensor, dtype) -> int:
    """Bytes of the distinct tensors one block's forward saves for backward, parameters and
    autocast's copies of them aside (the planner counts those as buffers)."""
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        # A weight, or autocast's low-precision copy of one (transposed for the product).
        weight_copy = tensor.grad_fn is not None and tensor.grad_fn.name() == "TBackward0"
        if storage.data_ptr() not in weights and not weight_copy:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            block(x)
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model", [
    [], ["model.dropout=0.1"], ["model.impl=manual"], ["model.impl=manual", "model.dropout=0.1"],
    ["model.pos=rope"], ["model.d_ff=200"],
])
def test_the_activation_estimate_is_what_a_block_saves_for_backward(model, precision):
    cfg = make_config("model.n_embd=64", "model.n_head=4", f"precision={precision}", *model)
    batch, length = 4, 48
    estimate = Activations(cfg.model, batch, length, 4 if precision == "fp32" else 2, "cpu").block()
    block = Block(cfg.model, Rotary(16) if cfg.model.pos == "rope" else None)
    dtype = None if precision == "fp32" else torch.bfloat16
    x = torch.randn(batch, length, 64, requires_grad=True)
    assert estimate == pytest.approx(saved_for_backward(block, x, dtype), rel=0.05)


def test_checkpointing_keeps_only_block_inputs():
    cfg = make_config("model=small", "model.n_layer=12")
    plan = plan_memory(cfg, Layout(1, 13, 33, "cpu"))[0]
    assert plan.activations == plan.activations_without_checkpointing
    assert plan.activations_with_checkpointing < plan.activations_without_checkpointing / 3
    ckpt = plan_memory(make_config("model=small", "model.n_layer=12",
                                   "model.activation_checkpointing=true"),
                       Layout(1, 13, 33, "cpu"))[0]
    assert ckpt.activations == plan.activations_with_checkpointing
    assert ckpt.peak < plan.peak


def test_fsdp_divides_the_state_between_ranks():
    cfg = make_config("model=small", "parallel=fsdp")
    one, four = (plan_memory(cfg, Layout(n, 16, 33, "cpu")) for n in (1, 4))
    for key in ("params", "grads"):
        assert sum(getattr(rank, key) for rank in four) == getattr(one[0], key)
    assert four[0].optimizer < one[0].optimizer / 3


def test_what_fits_names_changes_that_do_fit():
    cfg = make_config("model=gpt2-xl", "train.batch_size=8")
    layout = Layout(1, 50257, 1024, "cuda")
    budget = 40 * 2**30
    assert max(p.peak for p in plan_memory(cfg, layout)) > budget
    fits = what_fits(cfg, layout, budget)
    assert fits and all(peak <= budget for _, peak in fits)
    assert any("parallel=fsdp" in overrides for overrides, _ in fits)


def test_the_search_for_what_fits_builds_the_model_once(monkeypatch):
    """The layouts it tries change no parameter's shape. It built the meta model once per layout
    tried (and walked its 676 parameters twice for every rank): 6 s of plan=true for gpt2-xl
    on 8 ranks."""
    from txtrain import planner

    built = []
    monkeypatch.setattr(planner, "meta_model", lambda *args: built.append(args) or meta_model(*args))
    fits = what_fits(make_config("model=gpt2-xl", "parallel=fsdp"), Layout(8, 50257, 1024, "cuda"), 8 * 2**30)
    assert len(fits) == 3 and len(built) == 1


def test_plan_true_prints_the_plan_and_trains_nothing(tmp_path):
    started = time.perf_counter()
    result = run_txtrain("model=gpt2-xl", "parallel=fsdp", "plan=true", "plan.world_size=8",
                         "plan.device_memory_gb=1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert time.perf_counter() - started < 30  # a meta-device model: nothing is allocated
    assert "memory plan per rank" in result.stdout and "fsdp x8" in result.stdout
    assert "does not fit in 1 GiB" in result.stdout and "what would fit" in result.stdout
    assert list(tmp_path.iterdir()) == []  # no run dir, no log file


def test_a_pipeline_plan_needs_ranks(tmp_path):
    result = run_txtrain("parallel=pipeline", "model.tie_embeddings=false", "plan=true", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: parallel=pipeline needs 2 or more ranks")


def test_the_meta_model_skips_initializers_and_puts_them_back():
    normal, uniform = torch.nn.init.normal_, torch.nn.init.uniform_
    with skip_initializers():
        assert torch.nn.init.normal_(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]
    assert (torch.nn.init.normal_, torch.nn.init.uniform_) == (normal, uniform)
    model = meta_model(make_config("model=gpt2").model, 50257)  # shapes only, nothing to set
    assert model.head.weight.is_meta and model.head.weight.shape == (50304, 768)
    assert torch.nn.init.normal_(torch.zeros(1000)).std() > 0.5  # the real one again
