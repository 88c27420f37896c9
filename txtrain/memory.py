"""Measuring memory: what the model and optimizer hold, and the peak a run reaches.

The planner (``planner.py``) predicts; this module checks. ``held_bytes`` counts the tensors
themselves (this rank's shards of sharded ones). ``PeakMemory`` follows the training steps'
peak: on CUDA the caching allocator's ``max_memory_allocated``; on a CPU the process's peak
resident size (VmHWM) above what it held before the model was built, which also counts
allocator slack and what the libraries set up on first use (tens of MB: kernels, thread
pools). ``scripts/memory_table.py`` reads a CPU allocator's own peak from a memory profile.
"""

from __future__ import annotations

import re
import resource
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn


def tensor_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if hasattr(tensor, "to_local") else tensor  # a DTensor's shard
    return local.numel() * local.element_size()


def held_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameters, gradients and optimizer state, counted from the tensors this rank holds."""
    params = list(model.parameters())
    return {
        "params": sum(tensor_bytes(p) for p in params),
        "grads": sum(tensor_bytes(p.grad) for p in params if p.grad is not None),
        "optimizer": sum(tensor_bytes(value) for state in optimizer.state.values()
                         for value in state.values() if isinstance(value, torch.Tensor)),
    }


class PeakMemory:
    """The peak over training steps only: evaluation and saving run inside ``paused()``."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.baseline = self.current()
        self.reset()
        self.peak = 0

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated"
        return "peak resident size above the start (VmHWM)" if PROC.exists() else "ru_maxrss"

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return proc_status("VmRSS") if PROC.exists() else 0

    def high_water(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        if PROC.exists():
            return proc_status("VmHWM")
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif PROC.exists():
            try:  # "5" resets the high-water mark to the current size (Linux 4.0+)
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def bytes(self) -> int:
        """The highest memory in use by training so far, above the baseline."""
        return max(self.peak, self.high_water()) - self.baseline

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave what runs inside (an evaluation, a save) out of the peak. Training steps need
        no pause between them: the peak from one pause to the next is theirs."""
        # On a CPU the reset writes /proc/self/clear_refs, which takes the address space's lock
        # for writing (about 0.2 ms, even at 2 GiB resident and 64 threads): cheap, but a step
        # should not wait on a lock that its own allocations need.
        self.peak = max(self.peak, self.high_water())
        yield
        self.reset()


PROC = Path("/proc/self/status")


def proc_status(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", PROC.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0
