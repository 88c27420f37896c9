"""Early stopping (``train.patience=K``): stop after K evaluations in a row that do not improve
the task's main metric (its ``main_metric``: exact match up, validation loss down) by more
than ``train.min_delta``.

The trainer saves a checkpoint at each evaluation that improves the metric, and the
checkpoints keep it, named by ``checkpoints/best``, whatever ``train.keep_last`` deletes. The
count lives in each checkpoint's meta (``state_dict``), so a resumed run stops where an
uninterrupted one would. Every rank decides the same: the metric is the same on every rank.
"""

from __future__ import annotations

import math


class EarlyStopping:
    def __init__(self, main_metric: tuple[str, str], patience: int | None, min_delta: float = 0.0):
        self.metric, self.mode = main_metric  # mode: "max" or "min"
        self.patience = patience or 0  # 0: off; nothing is tracked
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.evals_without_improvement = 0

    @property
    def enabled(self) -> bool:
        return self.patience > 0

    def update(self, step: int, results: dict) -> bool:
        """Take the evaluation at ``step``; whether it improved on the best so far."""
        if not self.enabled:
            return False
        value = results[self.metric]
        if self.improves(value):
            self.best, self.best_step, self.evals_without_improvement = value, step, 0
            return True
        self.evals_without_improvement += 1
        return False

    def improves(self, value: float) -> bool:
        if not math.isfinite(value):  # a diverged evaluation is never the best
            return False
        if self.best is None:
            return True
        gain = value - self.best if self.mode == "max" else self.best - value
        return gain > self.min_delta

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.evals_without_improvement >= self.patience

    def wants_checkpoint(self, step: int) -> bool:
        """Save at ``step``: it is the best so far (its weights must exist on disk) or the
        last one of the run."""
        return self.enabled and (self.best_step == step or self.should_stop)

    def describe_stop(self, step: int) -> str:
        line = (f"early stop at step {step}: {self.metric} has not improved by more than "
                f"{self.min_delta:g} for {self.evals_without_improvement} evaluations")
        if self.best is None:
            return line + " (it was never finite)"
        return line + f"; best {self.best:.4g} at step {self.best_step}"

    def record(self) -> dict:
        """For run.json."""
        return {"main_metric": self.metric, "best_step": self.best_step, "best_metric": self.best}

    # --- in a checkpoint's meta ----------------------------------------------------------------
    def state_dict(self) -> dict:
        if not self.enabled:
            return {}
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "evals_without_improvement": self.evals_without_improvement}

    def load_state_dict(self, state: dict) -> None:
        """Continue the count a checkpoint holds; one written with train.patience off, or
        watching another metric, holds none: the count starts afresh."""
        if state.get("metric") != self.metric:
            return
        self.best, self.best_step = state["best"], state["best_step"]
        self.evals_without_improvement = state["evals_without_improvement"]
