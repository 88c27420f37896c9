"""Parallel strategies, one module each, behind the interface in ``base.py``."""

from __future__ import annotations

from txtrain.config import Config
from txtrain.parallel.base import SingleProcess


def build_strategy(cfg: Config, seq_len: int) -> SingleProcess:
    """The strategy ``cfg.parallel.name`` names; ``seq_len`` is the longest sequence the task
    produces (a pipeline pads every batch to it)."""
    name = str(cfg.parallel.name)
    if name == "none":
        return SingleProcess(cfg.parallel, cfg.device)
    if name == "dp":
        from txtrain.parallel.dp import DP
        return DP(cfg.parallel, cfg.device, str(cfg.precision.name), cfg.compile)
    if name == "ddp":
        from txtrain.parallel.ddp import DDP
        return DDP(cfg.parallel, cfg.device)
    if name == "fsdp":
        from txtrain.parallel.fsdp import FSDP
        return FSDP(cfg.parallel, cfg.device, str(cfg.precision.name))
    if name == "pipeline":
        from txtrain.parallel.pipeline import Pipeline
        return Pipeline(cfg.parallel, cfg.device, seq_len)
    raise ValueError(f"unknown strategy {name}")


__all__ = ["SingleProcess", "build_strategy"]
