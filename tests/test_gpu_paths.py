"""GPU-only code paths, tested on the CPU through their mechanism: what DataParallel's replica
threads do to autocast, what its scatter and gather do to evaluation and sampling, and
refusing what cannot work on several GPUs."""

import json
import math
import threading
import time

import pytest
import torch
from torch import nn
from torch.nn.parallel import scatter_gather

import forked
from conftest import make_config, quiet
from txtrain.config import ConfigError
from txtrain.parallel.dp import DP, AutocastEachReplica
from txtrain.train import Trainer


def output_dtype_in_a_replica_thread(module: nn.Module) -> torch.dtype:
    """What torch.nn.parallel.parallel_apply does in each replica's thread: autocast is entered
    again, enabled but without the caller's dtype, so it takes the device's default (fp16 on
    CUDA; bf16 on the CPU, where this test runs)."""
    seen = []

    def worker():
        with torch.amp.autocast("cpu", enabled=True):
            seen.append(module(torch.randn(2, 8)).dtype)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    return seen[0]


def test_each_data_parallel_replica_computes_in_the_runs_dtype():
    linear = nn.Linear(8, 8)
    wanted = torch.float16  # the CPU's default is bf16: the run asks for the other one
    assert output_dtype_in_a_replica_thread(linear) == torch.bfloat16  # the mechanism of the bug
    assert output_dtype_in_a_replica_thread(AutocastEachReplica(linear, wanted, "cpu")) == wanted


def test_data_parallel_with_compile_on_several_gpus_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    cfg = make_config("parallel=dp", "compile=true")
    with pytest.raises(ConfigError, match="parallel=dp cannot run compile=true.*parallel=ddp"):
        DP(cfg.parallel, "cuda", "bf16", compile=True)
    DP(cfg.parallel, "cuda", "bf16", compile=False)  # without compile it is fine


class DataParallelOverTwoCPUs(nn.DataParallel):
    """torch's DataParallel.forward over two "GPUs" that are this CPU: torch's own scatter of
    the inputs and keyword arguments and its gather of the outputs (scatter_gather.py), with
    the CUDA copies under them made on the CPU in the shapes CUDA's give (``chunk``: as many
    pieces as there are rows, at most one per GPU; scalars gathered into a vector)."""

    def __init__(self, module: nn.Module):
        super().__init__(module)  # on a CPU it keeps no devices and calls the module whole
        self.device_ids, self.output_device, self.src_device_obj = [0, 1], 0, torch.device("cpu")
        self.dim = 0

    def replicate(self, module, device_ids):
        return [module for _ in device_ids]

    def parallel_apply(self, replicas, inputs, kwargs):
        return [replica(*args, **kw) for replica, args, kw in zip(replicas, inputs, kwargs)]


def scatter_on_cpu(target_gpus, chunk_sizes, dim, tensor):
    return tensor.chunk(len(target_gpus), dim)


def gather_on_cpu(target_device, dim, *outputs):
    if all(output.dim() == 0 for output in outputs):  # torch's Gather: "will instead unsqueeze"
        return torch.stack(outputs)
    return torch.cat(outputs, dim)


@pytest.fixture
def two_gpus_for_dp(monkeypatch):
    """parallel=dp as it runs over two GPUs, on the CPU."""
    init = DP.__init__

    def over_two(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.n_gpus = 2

    monkeypatch.setattr(DP, "__init__", over_two)
    monkeypatch.setattr(torch.cuda, "default_generators", (torch.Generator(), torch.Generator()))
    monkeypatch.setattr(nn, "DataParallel", DataParallelOverTwoCPUs)
    monkeypatch.setattr(scatter_gather.Scatter, "apply", scatter_on_cpu)
    monkeypatch.setattr(scatter_gather.Gather, "apply", gather_on_cpu)


def test_data_parallel_evaluates_and_samples_what_one_gpu_does(tmp_path, two_gpus_for_dp):
    """Training sums the loss DataParallel gathers from each GPU; evaluation and sampling must
    not hand on its vector of losses, nor a one-row prompt that reaches only one GPU."""
    text = tmp_path / "text.txt"
    text.write_text("socrates asks what justice is,\nand meno cannot say.\n" * 40)
    run = ["task=text", f"task.data.path={text}", "task.tokenizer=char", f"task.cache_dir={tmp_path}",
           "task.seq_len=16", "task.sample_tokens=8", "model.n_layer=1", "model.n_embd=32",
           "model.n_head=2", "model.max_seq_len=16", "model.dropout=0", "train.batch_size=4",
           "train.steps=2", "train.eval_every=2", "train.save_every=0", "device=cpu"]
    runs, wrappers = {}, {}
    for name, parallel in (("one", "none"), ("dp", "dp")):
        trainer = Trainer(make_config(f"parallel={parallel}", *run), tmp_path / name)
        trainer.fit()
        runs[name] = [json.loads(line) for line in (tmp_path / name / "eval.jsonl").read_text().splitlines()]
        wrappers[name] = type(trainer.model)
        trainer.close()
    assert wrappers["dp"] is DataParallelOverTwoCPUs  # what trained was DataParallel's forward
    assert runs["dp"][-1]["step"] == 2
    assert runs["dp"][-1]["val_loss"] == pytest.approx(runs["one"][-1]["val_loss"], rel=1e-5)
    assert (tmp_path / "dp" / "samples.txt").read_text() == (tmp_path / "one" / "samples.txt").read_text()


@pytest.fixture
def gpus(monkeypatch):
    """A node with ``gpus(n)`` GPUs visible, as far as txtrain asks torch; the devices that
    processes bind are recorded instead of bound."""
    bound = []

    def visible(n: int) -> list:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "set_device", bound.append)
        return bound

    return visible


def test_joining_a_job_binds_no_gpu_before_the_run_says_it_uses_one(gpus, monkeypatch):
    """A CPU run of two processes on a one-GPU node: rank 1 has no GPU 1 to bind, and needs none."""
    from txtrain import distributed

    bound = gpus(1)
    backends = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: backends.append(backend))
    for name, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    assert distributed.join_job()
    assert backends == ["cpu:gloo,cuda:nccl"] and bound == []


@pytest.mark.parametrize("visible, env, wanted", [
    (8, {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "8"}, 3),  # torchrun: one process per GPU
    (1, {"LOCAL_RANK": "5"}, 0),  # SLURM's --gpus-per-task=1: each task sees its own GPU alone
    (8, {"LOCAL_RANK": "5"}, 5),  # SLURM, every GPU of the node visible to every task
    (1, {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}, "2 processes on this node but 1 GPU visible"),
    (4, {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}, "8 processes on this node but 4 GPUs visible"),
    (4, {"LOCAL_RANK": "6"}, "local rank 6 on this node but 4 GPUs visible"),
])
def test_each_process_of_a_gpu_run_binds_a_gpu_of_its_own_or_is_refused(gpus, monkeypatch, visible, env, wanted):
    from txtrain.parallel.ddp import DDP

    bound = gpus(visible)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for name, value in dict(RANK="0", WORLD_SIZE="1", **env).items():
        monkeypatch.setenv(name, value)
    cfg = make_config("parallel=ddp")
    if isinstance(wanted, str):
        with pytest.raises(ConfigError, match=f"{wanted}: each process needs a GPU of its own.*device=cpu"):
            DDP(cfg.parallel, "auto")
        assert bound == []
    else:
        strategy = DDP(cfg.parallel, "auto")
        assert strategy.device == torch.device("cuda", wanted) and bound == [strategy.device]
    assert DDP(cfg.parallel, "cpu").device == torch.device("cpu")  # a CPU run binds nothing


def test_the_gpu_checks_data_parallel_row_trains_and_evaluates_through_data_parallel(tmp_path, two_gpus_for_dp):
    """scripts/gpu_check.py's dp-bf16 row, run as on two GPUs (its replicas here are both the
    CPU, so the row itself cannot pass: it wants two devices)."""
    from test_gpu_check import load_gpu_check

    gpu_check = load_gpu_check()
    context = gpu_check.Context("dp-bf16", "cuda", 2, tmp_path, time.time() + 300, None, None)
    result = gpu_check.check_dp_bf16(context)
    assert {dtype for _, dtype in result.data["seen"]} == {"bfloat16"}
    assert result.data["evaluation"]["exact_match"] >= 0 and math.isfinite(result.data["loss"])


ONE_NODE_WITHOUT_ITS_GPU = '''
"""txtrain under ddp on "GPUs" where rank 1's node has none to give it (rank 0 binds its own)."""
import os

import torch

import txtrain.parallel.base as base
from txtrain import cli
from txtrain.config import ConfigError


def own_gpu():
    if os.environ["RANK"] == "1":
        raise ConfigError("no GPU of its own here (injected)")
    return 0


base.own_gpu = own_gpu
base.pick_device = lambda name: torch.device("cuda")
torch.cuda.set_device = lambda device: None
cli.main()
'''


def test_a_rank_without_a_gpu_of_its_own_stops_every_rank(tmp_path):
    """Had rank 1 stopped alone, rank 0 would have gone on into DDP's first broadcast, and waited
    there for it (here, on a CPU, it fails to use its GPU instead)."""
    script = tmp_path / "one_node_without_its_gpu.py"
    script.write_text(ONE_NODE_WITHOUT_ITS_GPU)
    zero, one = forked.run(quiet(["parallel=ddp", "model.n_layer=1", "model.n_embd=32", "train.steps=1",
                                  f"hydra.run.dir={tmp_path / 'run'}"]), tmp_path, command=str(script), ranks=2)
    assert zero.returncode == one.returncode == 2, (zero.stderr[-2000:], one.stderr[-2000:])
    assert zero.stderr == ("error: finding each process's GPU failed on rank 1: ConfigError: no GPU of its "
                           "own here (injected)\n")
    assert one.stderr.strip() == ""
