"""Parallel strategies, one module each, behind the interface in ``base.py``; what each one is
without torch (its settings, its placement over ranks, where its class lives) is in
``specs.py``. Importing this package loads neither torch nor any strategy: the command line
reads the settings' schemas before torch, and a strategy's module is imported when a run
builds it."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from txtrain.parallel.specs import STRATEGIES

if TYPE_CHECKING:
    from txtrain.config import Config
    from txtrain.parallel.base import Strategy


def strategy_class(name: str) -> type[Strategy]:
    """The class of ``parallel=<name>``, its module imported now."""
    module, _, class_name = STRATEGIES[name].strategy.partition(":")
    return getattr(import_module(module), class_name)


def build_strategy(cfg: Config, seq_len: int) -> Strategy:
    """The strategy ``cfg.parallel.name`` names; ``seq_len`` is the longest sequence the task
    produces (a pipeline pads every batch to it)."""
    return strategy_class(cfg.parallel.name).from_config(cfg, seq_len)


__all__ = ["STRATEGIES", "build_strategy", "strategy_class"]
