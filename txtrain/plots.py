"""Loss curves as pictures: ``loss.png`` for a run, and one overlay for a sweep.

    txtrain-plot <run dir>      training loss (left axis) and the evaluation metric (right
                                axis) against steps, with tokens seen along the top
    txtrain-plot <sweep dir>    every run's curves in one figure, labelled by its overrides;
                                runs that differ only in seed as one mean curve per group,
                                with a band of one standard deviation either side

Matplotlib is an optional extra (``pip install 'txtrain[plot]'``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from txtrain.summary import SEED, find_runs, read_jsonl, run_label, seed_groups, varying

# The metric drawn on the right axis: the first of these that the run's evaluations have.
EVAL_METRICS = ("val_loss", "exact_match", "eval_loss")


def new_figure(width: float, height: float):
    """A figure drawn straight to a file: no window, and not pyplot, whose import (a GUI
    backend search) costs half a second of every run's end."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("matplotlib is not installed (pip install 'txtrain[plot]')") from None
    return Figure(figsize=(width, height))


def eval_metric(evals: list[dict]) -> str | None:
    return next((m for m in EVAL_METRICS if evals and m in evals[0]), None)


def plot_run(run_dir: Path) -> Path:
    """Write ``<run_dir>/loss.png``; returns its path."""
    metrics, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    fig = new_figure(7, 4.2)
    ax = fig.subplots()
    twin = ax.twinx()
    label_eval_axis(twin, draw_run(ax, twin, metrics, evals, label=None, color="tab:blue"))
    add_tokens_axis(ax, metrics)
    fig.suptitle(f"{run_dir.parent.name}/{run_dir.name}", fontsize=10)
    return save(fig, run_dir / "loss.png")


def plot_sweep(sweep_dir: Path) -> Path:
    """Write ``<sweep_dir>/loss.png``: every run's curves, one colour per run."""
    runs = find_runs(sweep_dir)
    if not runs:
        raise FileNotFoundError(f"no runs (folders with metrics.jsonl) under {sweep_dir}")
    if SEED in varying(runs):
        return plot_seed_groups(sweep_dir, runs)
    fig = new_figure(8, 4.8)
    ax = fig.subplots()
    twin = ax.twinx()
    colors = [f"C{i}" for i in range(10)]  # the default colour cycle
    metric = None
    for i, (run_dir, overrides) in enumerate(runs.items()):
        metric = draw_run(ax, twin, read_jsonl(run_dir / "metrics.jsonl"),
                          read_jsonl(run_dir / "eval.jsonl"), label=run_label(overrides, runs)
                          or run_dir.name, color=colors[i % len(colors)]) or metric
    label_eval_axis(twin, metric)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    ax.set_title(f"{sweep_dir.name}: {len(runs)} runs", fontsize=10)
    return save(fig, sweep_dir / "loss.png")


def plot_seed_groups(sweep_dir: Path, runs: dict[Path, list[str]]) -> Path:
    """The sweep's ``loss.png`` when its runs differ in seed: per group of runs that differ
    only in seed, the mean curve and a band of +- one standard deviation across its seeds."""
    groups = seed_groups(runs)
    fig = new_figure(8, 4.8)
    ax = fig.subplots()
    twin = ax.twinx()
    colors = [f"C{i}" for i in range(10)]
    keys = set(varying(runs))
    metric = None
    for i, (key, run_dirs) in enumerate(groups.items()):
        color = colors[i % len(colors)]
        label = " ".join(o for o in key if o.partition("=")[0] in keys) or "all runs"
        label = f"{label} ({len(run_dirs)} seeds)"
        curves = [[m for m in read_jsonl(r / "metrics.jsonl") if m.get("loss") is not None]
                  for r in run_dirs]
        draw_band(ax, [{m["step"]: m["loss"] for m in c} for c in curves], color, "-", label)
        evals = [read_jsonl(r / "eval.jsonl") for r in run_dirs]
        found = next((m for m in (eval_metric(e) for e in evals) if m is not None), None)
        if found is not None:
            metric = metric or found
            draw_band(twin, [{e["step"]: e[found] for e in run if found in e} for run in evals],
                      color, "--", None, marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (solid)")
    label_eval_axis(twin, metric)
    wide = max(len(line.get_label()) for line in ax.lines) > 45  # long labels: one column
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1 if wide else 2,
              frameon=False)
    ax.set_title(f"{sweep_dir.name}: {len(runs)} runs in {len(groups)} groups, mean +- std "
                 "over seeds", fontsize=10)
    return save(fig, sweep_dir / "loss.png")


def draw_band(ax, curves: list[dict[int, float]], color: str, linestyle: str,
              label: str | None, marker: str | None = None) -> None:
    """The mean of ``curves`` (step -> value, one per seed) at each step that any of them
    logged, and a band of +- one sample standard deviation where two or more did."""
    steps = sorted({step for curve in curves for step in curve})
    means, lows, highs = [], [], []
    for step in steps:
        values = [curve[step] for curve in curves if step in curve]
        mean = sum(values) / len(values)
        spread = sum((v - mean) ** 2 for v in values)
        std = (spread / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
        means.append(mean)
        lows.append(mean - std)
        highs.append(mean + std)
    ax.plot(steps, means, color=color, linestyle=linestyle, label=label, linewidth=1.2,
            marker=marker, markersize=3 if marker else None)
    ax.fill_between(steps, lows, highs, color=color, alpha=0.2, linewidth=0)


def draw_run(ax, twin, metrics: list[dict], evals: list[dict], label: str | None,
             color: str) -> str | None:
    """Training loss as a solid line on ``ax``; the evaluation metric dashed on ``twin`` (the
    right-hand axis). Returns the metric's name, None if the run has no evaluations."""
    logged = [m for m in metrics if m.get("loss") is not None]
    ax.plot([m["step"] for m in logged], [m["loss"] for m in logged], color=color, label=label,
            linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (solid)")
    metric = eval_metric(evals)
    if metric is not None:
        twin.plot([e["step"] for e in evals], [e[metric] for e in evals], color=color,
                  linestyle="--", marker="o", markersize=3, linewidth=1)
    return metric


def label_eval_axis(twin, metric: str | None) -> None:
    if metric is None:
        twin.set_axis_off()
    else:
        twin.set_ylabel(f"{metric} (dashed)")


def add_tokens_axis(ax, metrics: list[dict]) -> None:
    """Tokens seen along the top, at the run's average tokens per step."""
    if not metrics or metrics[-1]["step"] == 0:
        return
    per_step = metrics[-1]["tokens"] / metrics[-1]["step"]
    top = ax.secondary_xaxis("top", functions=(lambda s: s * per_step, lambda t: t / per_step))
    top.set_xlabel("tokens seen")


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="txtrain-plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a run dir or a sweep dir")
    folder = parser.parse_args(argv).folder
    try:
        if (folder / "metrics.jsonl").is_file():
            path = plot_run(folder)
        else:
            path = plot_sweep(folder)
    except (ImportError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(path)


if __name__ == "__main__":
    main()
