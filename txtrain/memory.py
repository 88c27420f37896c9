"""Measuring memory: what the model and optimizer hold, and the peak a run reaches.

The planner (``planner.py``) predicts; this module checks. ``held_bytes`` counts the tensors
themselves (this rank's shards of sharded ones). ``PeakMemory`` reports a rank's peak:

- on CUDA, the caching allocator's ``max_memory_allocated`` over the training steps only
  (evaluation and saving run inside ``paused()``), above what was allocated before the model;
- on a CPU, the process's peak resident size over its whole life, start-up, evaluation and
  saving included: VmHWM, the very counter the kernel reports at exit as the maximum resident
  size (``getrusage``'s ``ru_maxrss``, ``/usr/bin/time``'s), so the two agree. It counts the
  interpreter and libraries, and the allocator's slack (``allocator.py``). ``baseline`` is what
  the process held before the model was built.

The CPU peak is never reset. Resetting it (writing "5" to /proc/self/clear_refs, as txtrain
once did to leave evaluation out) resets the kernel's own high-water mark too: the OS then
reported only the peak since the last evaluation (2.8 GiB for a run that reached 5.9 GiB), and
the kernel keeps no other peak over a window of time. ``scripts/memory_table.py`` reads a CPU
allocator's own peak from a memory profile.
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
    """A rank's peak: on CUDA over training steps only (evaluation and saving run inside
    ``paused()``); on a CPU the process's, over its whole life (see the module's docstring)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.baseline = self.current()  # before the model: what the process already held
        self.reset()
        self.peak = 0

    @property
    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated"
        counter = "VmHWM" if PROC.exists() else "ru_maxrss"
        return f"the process's peak resident size over the whole run: {counter}, the OS's max RSS"

    def current(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device)
        return proc_status("VmRSS") if PROC.exists() else 0

    def high_water(self) -> int:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device)
        if PROC.exists():
            return proc_status("VmHWM")  # this process's own (ru_maxrss may hold a parent's)
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale

    def reset(self) -> None:
        """Restart CUDA's peak. A CPU's is never reset: that would reset the OS's own."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)

    def bytes(self) -> int:
        """On CUDA the training steps' peak above the baseline; on a CPU the process's peak."""
        if not self.cuda:
            return self.high_water()
        return max(self.peak, self.high_water()) - self.baseline

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave what runs inside (an evaluation, a save) out of CUDA's peak. Training steps need
        no pause between them: the peak from one pause to the next is theirs."""
        self.peak = max(self.peak, self.high_water())
        yield
        self.reset()


PROC = Path("/proc/self/status")


def proc_status(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", PROC.read_text(), re.MULTILINE)
    return int(match.group(1)) * 1024 if match else 0
