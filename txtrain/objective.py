"""What a hyperparameter search reads from a run: the number ``txtrain`` returns to Hydra.

A sweeper that optimizes (``hydra/sweeper=optuna``) takes the return value of each job as the
trial's value. A run returns ``objective`` from its final result: by default the task's
evaluation loss (``val_loss``, or ``eval_loss`` for copy, reverse and fibonacci), which the
sweeper minimizes; ``objective=exact_match hydra.sweeper.direction=maximize`` searches for
exact match instead. A run that diverged, or whose objective is not finite, returns the worst
value for the sweeper's direction (+inf when minimizing): the trial counts as the worst one,
so the sampler learns to avoid its region, and the search goes on.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from txtrain import distributed
from txtrain.config import ConfigError, require

LOSS_KEYS = ("val_loss", "eval_loss")  # the evaluation loss: text tasks, synthetic tasks


def search_direction() -> str | None:
    """How the sweeper running this job optimizes its return value, "minimize" or
    "maximize"; None where nothing reads it (a single run, Hydra's basic sweeper)."""
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or "direction" not in hydra_cfg.sweeper:
        return None
    direction = hydra_cfg.sweeper.direction
    if isinstance(direction, Sequence) and not isinstance(direction, str):
        require(len(direction) == 1, "a run returns one objective: give hydra.sweeper.direction "
                                     "one direction, not a list")
        direction = direction[0]
    check_seed(hydra_cfg)
    return getattr(direction, "name", str(direction))  # the sweeper's Direction enum, or a word


def check_seed(hydra_cfg) -> None:
    """An unseeded sampler draws other trials at every search. Under torchrun, where every
    process runs the search, each would draw its own: refused. Elsewhere, said once."""
    sampler = hydra_cfg.sweeper.get("sampler") or {}
    if "seed" not in sampler or sampler["seed"] is not None:  # seeded, or needs none (grid)
        return
    require(not distributed.under_torchrun(), "under torchrun every process runs the search and "
            "must draw the same trials: set hydra.sweeper.sampler.seed")
    if hydra_cfg.job.num == 0:  # on the terminal, not in the log file of a run it may refuse
        print("note: the sampler has no seed, so this search cannot be repeated; "
              "hydra.sweeper.sampler.seed=0 would make it repeatable", file=sys.stderr, flush=True)


def check_direction(objective: str | None, main_metric: tuple[str, str] | None,
                    direction: str | None) -> None:
    """Refuse a search that would optimize the wrong way: a loss maximized, or the task's
    main metric (None: not known here) against its sense (exact match minimized)."""
    if direction is None:
        return
    metric, sense = main_metric or ("", "")
    if objective is None or objective.endswith("loss"):
        better = "minimize"
    elif objective == metric:
        better = "minimize" if sense == "min" else "maximize"
    else:
        return  # a metric whose sense the run does not know (perplexity, tokens_per_s, ...)
    if direction == better:
        return
    shown = f"objective={objective}" if objective else "the objective (the task's evaluation loss)"
    other = f", or search objective={metric}" if objective is None and sense == "max" else ""
    raise ConfigError(f"{shown} is better {'lower' if better == 'minimize' else 'higher'} and the "
                      f"sweeper would {direction} it: set hydra.sweeper.direction={better}{other}")


def objective_value(objective: str | None, result: dict) -> float:
    """``objective`` of the run's result (its final evaluation, its final training ``loss``,
    ...), NaN where it was not finite (run.json writes such a number as null)."""
    key = objective or next((k for k in LOSS_KEYS if k in result), None)
    if key is None or key not in result:
        names = ", ".join(k for k, v in result.items() if isinstance(v, (int, float)) or v is None)
        raise ConfigError(f"objective={objective}: the run's result has no such value "
                          f"(it has {names})")
    value = result[key]
    return math.nan if value is None else float(value)


def recorded(objective: str | None, run_dir: Path) -> float:
    """``objective`` of a finished run, from its run.json (written by its rank 0)."""
    return objective_value(objective, json.loads((run_dir / "run.json").read_text())["result"])


def returned(value: float, direction: str | None) -> float:
    """What the job returns: the value, or the worst one for the search where it is not
    finite (optuna would mark a NaN trial failed, and its sampler ignores failed trials)."""
    if direction is None or math.isfinite(value):
        return value
    return math.inf if direction == "minimize" else -math.inf
