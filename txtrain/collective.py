"""Phases that end the same way on every rank.

Some steps of a save or a load run on one rank (rank 0 publishes a checkpoint) or on each rank
separately (each reads its shards). If one rank's part fails and it simply raised, it would go
its own way while the others wait for it in their next collective, for ever. So each rank runs
its part catching its failure, the ranks exchange outcomes (one ``all_gather_object``, which
works under gloo and NCCL alike), and every rank raises the same ``PhaseFailed``, or none does.
"""

from __future__ import annotations

import socket
from typing import Callable, TypeVar

import torch.distributed as dist

from txtrain.config import ConfigError

T = TypeVar("T")
Gather = Callable[[object], list]


def gather_all(obj: object) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` in one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, obj)
    return everyone


class PhaseFailed(Exception):
    """A phase that failed on some rank, raised on every rank with the same message."""

    def __init__(self, phase: str, failures: list[tuple[list[int], str]]):
        self.phase, self.failures = phase, failures
        super().__init__(f"{phase} {describe_ranks(failures)}")


def describe_ranks(failures: list[tuple[list[int], str]]) -> str:
    """``on rank 1: OSError: ...``; ranks that failed alike share one clause."""
    clauses: dict[str, set[int]] = {}
    for ranks, what in failures:
        clauses.setdefault(what, set()).update(ranks)
    return "; ".join(f"on rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, sorted(ranks)))}: {what}"
                     for what, ranks in clauses.items())


def describe_failure(error: BaseException) -> str:
    """One line for an exception. torch.distributed.checkpoint raises a CheckpointException
    whose text holds each failed rank's traceback: keep the first underlying exception."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        error = inner[0] if isinstance(inner, tuple) else inner
    text = " ".join(str(error).split()) or "no message"
    return f"{type(error).__name__}: {text}"[:400]


def failed_ranks(error: BaseException) -> list[int]:
    """The ranks where ``error`` happened: this one, or for torch.distributed.checkpoint's
    CheckpointException (raised on every rank) the ranks it names."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        return sorted(failures)
    return [dist.get_rank() if dist.is_available() and dist.is_initialized() else 0]


def agree(phase: str, action: Callable[[], T], gather: Gather = gather_all,
          describe: Callable[[BaseException], str] = describe_failure) -> T:
    """Run this rank's part of ``phase``; then, if it failed on any rank, raise the same
    ``PhaseFailed`` on every rank (chained to the local error where there is one). Every rank
    must call it, even one with nothing to do (``action`` returning None)."""
    local: BaseException | None = None
    try:
        result = action()
    except (KeyboardInterrupt, SystemExit):  # the user wants out now; torchrun ends the others
        raise
    except BaseException as error:  # also CheckpointException, which is not an Exception
        local, result = error, None
    outcomes = gather(None if local is None else (failed_ranks(local), describe(local)))
    failures = [outcome for outcome in outcomes if outcome is not None]
    if failures:
        raise PhaseFailed(phase, failures) from local
    return result


def agree_or_refuse(phase: str, action: Callable[[], T]) -> T:
    """``agree``, for a phase whose failure is the user's to mend (a node without a GPU for
    each process, outputs that cannot be deleted): one line, the same ConfigError on every rank."""
    try:
        return agree(phase, action)
    except PhaseFailed as failure:
        raise ConfigError(str(failure)) from None


def node_leader(gather: Gather = gather_all) -> bool:
    """Whether this rank is the first on its host: work that reads shared files once per node
    (hashing a checkpoint) is done by it alone. Every rank must call it."""
    hosts = gather(socket.gethostname())
    rank = dist.get_rank() if len(hosts) > 1 else 0
    return hosts.index(hosts[rank]) == rank
