"""Tasks build their vocabulary, their training batches and their evaluation."""

from __future__ import annotations

from txtrain.config import SyntheticTaskConfig
from txtrain.tasks.base import IGNORE_INDEX, Batch, Task


def build_task(cfg, seed: int) -> Task:
    if isinstance(cfg, SyntheticTaskConfig):
        from txtrain.tasks.synthetic import SyntheticTask

        return SyntheticTask(cfg, seed)
    raise TypeError(f"no task implements config {type(cfg).__name__}")


__all__ = ["IGNORE_INDEX", "Batch", "Task", "build_task"]
