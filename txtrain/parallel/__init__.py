"""Parallel strategies, one module each, behind the interface in ``base.py``."""

from __future__ import annotations

from txtrain.config import Config
from txtrain.parallel.base import SingleProcess


def build_strategy(cfg: Config) -> SingleProcess:
    name = str(cfg.parallel.name)
    if name == "none":
        return SingleProcess(cfg.device)
    raise ValueError(f"unknown strategy {name}")


__all__ = ["SingleProcess", "build_strategy"]
