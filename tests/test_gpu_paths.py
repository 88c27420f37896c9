"""GPU-only code paths, tested on the CPU through their mechanism: what DataParallel's replica
threads do to autocast, and refusing what cannot work on several GPUs."""

import threading

import pytest
import torch
from torch import nn

from conftest import make_config
from txtrain.config import ConfigError
from txtrain.parallel.dp import DP, AutocastEachReplica


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
