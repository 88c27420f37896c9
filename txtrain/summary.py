"""``txtrain-summary <sweep dir>``: one row per run of a sweep, its overrides against its results.

The table goes to the terminal as Markdown and into the sweep dir as ``summary.md`` and
``summary.csv``. Columns: the overrides that differ between runs, then the final training
loss, the best evaluation (highest exact_match, or lowest val_loss / eval_loss), tokens per
second and wall time. A run trained with ``train.patience`` shows its best checkpoint's step
and metric, as its run.json records them (the best by more than ``train.min_delta``: the
checkpoint ``txtrain-sample --best`` loads), and whether it stopped early.

A search (``hydra/sweeper=optuna``) adds each trial's ``objective`` (what the run returned to
the sweeper) after its overrides, and a line under the table naming the best trial, from the
sweeper's ``optimization_results.yaml``.

Runs that differ only in ``seed`` are one row: ``n_seeds``, and for the final loss and the
best evaluation their mean, standard deviation and the half-width of a 95% confidence interval
(Student's t); ``--baseline "optim.lr=1e-3"`` adds each group's Welch t-test p-value against
the group with those overrides. The t distribution is computed here (the regularized
incomplete beta function), so that a summary needs no scipy.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import yaml

from txtrain.config import ConfigError
from txtrain.objective import objective_value

BEST = {"exact_match": max, "val_loss": min, "eval_loss": min}  # in this order of preference
SEED = "seed"
SEARCH_RESULTS = "optimization_results.yaml"  # what hydra-optuna-sweeper writes into the sweep dir


# -- Student's t, without scipy -------------------------------------------------------------

def betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction
    (modified Lentz; Numerical Recipes' betacf), accurate to about 1e-14."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x must be in [0, 1], not {x}")
    if x in (0.0, 1.0):
        return x
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point
        return 1.0 - betainc(b, a, 1.0 - x)
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                 + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * fraction / a


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom (need not be whole)."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t such that P(T <= t) = p, by bisection on t_cdf (to about 1e-12)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p must be in (0, 1), not {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
        if high - low < 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


def mean_std_ci(values: list[float], level: float = 0.95) -> tuple[float, float | None, float | None]:
    """Mean, sample standard deviation (n - 1) and the confidence interval's half-width
    (the interval is mean +- half-width); None for the last two with a single value."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None, None
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, std, t_quantile(0.5 + level / 2.0, n - 1) * std / math.sqrt(n)


def welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances) that the means of a and b are
    equal. None when it is undefined: fewer than two values in either, or no spread in both."""
    if len(a) < 2 or len(b) < 2:
        return None
    (mean_a, std_a, _), (mean_b, std_b, _) = mean_std_ci(a), mean_std_ci(b)
    var_a, var_b = std_a ** 2 / len(a), std_b ** 2 / len(b)
    if var_a + var_b == 0.0:
        return None
    t = (mean_a - mean_b) / math.sqrt(var_a + var_b)
    df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
    return betainc(df / 2.0, 0.5, df / (df + t * t))


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def find_runs(sweep_dir: Path) -> dict[Path, list[str]]:
    """Every run under ``sweep_dir`` (a folder with metrics.jsonl), in job order, with the
    overrides Hydra recorded for it."""
    runs = {}
    for metrics in sorted(sweep_dir.rglob("metrics.jsonl"), key=job_order):
        overrides_file = metrics.parent / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        runs[metrics.parent] = [o for o in overrides or [] if not o.startswith("hydra.")]
    return runs


def job_order(metrics: Path):
    name = metrics.parent.name  # Hydra names a sweep's runs 0, 1, 2, ...
    return (0, int(name), "") if name.isdigit() else (1, 0, str(metrics))


def varying(runs: dict[Path, list[str]]) -> list[str]:
    """The override keys whose value is not the same in every run (all of them for one run)."""
    keys = list(dict.fromkeys(o.partition("=")[0] for overrides in runs.values() for o in overrides))
    if len(runs) == 1:
        return keys

    def value(overrides: list[str], key: str) -> str | None:
        return next((v for k, _, v in (o.partition("=") for o in overrides) if k == key), None)

    return [key for key in keys if len({value(o, key) for o in runs.values()}) > 1]


def run_label(overrides: list[str], runs: dict[Path, list[str]]) -> str:
    keys = set(varying(runs))
    return " ".join(o for o in overrides if o.partition("=")[0] in keys)


def summarize(run_dir: Path, overrides: list[str], keys: list[str]) -> dict:
    metrics, evals = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "eval.jsonl")
    info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    result = info.get("result", {})
    given = dict(o.partition("=")[::2] for o in overrides)
    row = {key: given.get(key, "") for key in keys}
    row["final_loss"] = metrics[-1]["loss"] if metrics else None
    if "best_step" in info:  # train.patience: the run's own verdict, which names its best checkpoint
        row[f"best_{info['main_metric']}"] = info["best_metric"]
        row["best_at_step"] = info["best_step"]
        row["stopped_early"] = info["stopped_early"]
    elif (metric := next((m for m in BEST if evals and m in evals[0]), None)) is not None:
        best = BEST[metric](evals, key=lambda e: e[metric])
        row[f"best_{metric}"] = best[metric]
        row["best_at_step"] = best["step"]
    row["tokens_per_s"] = result.get("tokens_per_s")
    row["seconds"] = result.get("seconds")
    row["run_dir"] = run_dir.name
    return row


def summary_rows(sweep_dir: Path) -> list[dict]:
    runs = find_runs(sweep_dir)
    keys = varying(runs)
    rows = [summarize(run_dir, overrides, keys) for run_dir, overrides in runs.items()]
    if (sweep_dir / SEARCH_RESULTS).is_file():  # drawn values as numbers: the table rounds them
        rows = [{**row, **{key: as_number(row[key]) for key in keys}} for row in rows]
        rows = [{**{key: row[key] for key in keys}, "objective": trial_objective(run_dir), **row}
                for row, run_dir in zip(rows, runs)]
    return rows


def as_number(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def trial_objective(run_dir: Path) -> float | None:
    """What the run returned to the sweeper: its ``objective`` (from its saved config) in its
    run.json's result. None for a run that has no result (it diverged: the sweeper got the
    worst value)."""
    config_file, info_file = run_dir / ".hydra" / "config.yaml", run_dir / "run.json"
    if not (config_file.is_file() and info_file.is_file()):
        return None
    objective = (yaml.safe_load(config_file.read_text()) or {}).get("objective")
    try:
        return objective_value(objective, json.loads(info_file.read_text()).get("result", {}))
    except ConfigError:  # no such value in this run's result
        return None


def best_trial(sweep_dir: Path, rows: list[dict]) -> str | None:
    """The best trial of a search in one line, from the sweeper's results; None where there
    are none (or several: a multi-objective search's Pareto front)."""
    path = sweep_dir / SEARCH_RESULTS
    results = yaml.safe_load(path.read_text()) if path.is_file() else None
    if not results or "best_params" not in results:
        return None
    params, value = results["best_params"], results["best_value"]
    runs = find_runs(sweep_dir)
    matching = [run_dir.name for run_dir, overrides in runs.items()
                if all(any(k == name and same_value(v, str(wanted))
                           for k, _, v in (o.partition("=") for o in overrides))
                       for name, wanted in params.items())]
    # Several runs may share the parameters (a choice drawn twice): the one that returned the value.
    returned = {row["run_dir"]: row.get("objective") for row in rows}
    run = next((r for r in matching if returned.get(r) == value), matching[0] if matching else "?")
    chosen = " ".join(f"{name}={as_text(wanted)}" for name, wanted in params.items())
    return f"best trial: run {run}, {chosen}, objective {as_text(value)}"


def seed_groups(runs: dict[Path, list[str]]) -> dict[tuple[str, ...], list[Path]]:
    """The runs keyed by their overrides other than ``seed``, in order of their first run."""
    groups: dict[tuple[str, ...], list[Path]] = {}
    for run_dir, overrides in runs.items():
        key = tuple(o for o in overrides if o.partition("=")[0] != SEED)
        groups.setdefault(key, []).append(run_dir)
    return groups


def same_value(given: str, wanted: str) -> bool:
    """``1e-3`` and ``0.001`` are the same learning rate."""
    try:
        return given == wanted or float(given) == float(wanted)
    except ValueError:
        return False


def find_baseline(groups: dict[tuple[str, ...], list[Path]], baseline: str) -> tuple[str, ...]:
    """The one group whose overrides include every ``key=value`` of ``baseline``."""
    wanted = [o.partition("=")[::2] for o in baseline.split()]
    matches = [key for key in groups
               if all(any(k == name and same_value(v, value)
                          for k, _, v in (o.partition("=") for o in key)) for name, value in wanted)]
    if len(matches) != 1:
        names = "; ".join(" ".join(key) or "(no overrides)" for key in groups)
        raise ValueError(f"--baseline {baseline!r} matches {len(matches)} groups, not one "
                         f"(the groups: {names})")
    return matches[0]


def grouped_rows(sweep_dir: Path, baseline: str | None = None) -> list[dict]:
    """One row per group of runs that differ only in seed (see the module's docstring)."""
    runs = find_runs(sweep_dir)
    keys = [key for key in varying(runs) if key != SEED]
    groups = seed_groups(runs)
    per_run = {run_dir: summarize(run_dir, runs[run_dir], []) for run_dir in runs}
    base = find_baseline(groups, baseline) if baseline else None
    metrics = ["final_loss"] + list(dict.fromkeys(  # final_loss and best_<main metric>
        key for row in per_run.values() for key in row
        if key.startswith("best_") and key != "best_at_step"))

    def values(run_dirs: list[Path], metric: str) -> list[float]:
        return [per_run[r][metric] for r in run_dirs if per_run[r].get(metric) is not None]

    rows = []
    for key, run_dirs in groups.items():
        given = dict(o.partition("=")[::2] for o in key)
        row = {k: given.get(k, "") for k in keys}
        row["n_seeds"] = len(run_dirs)
        for metric in metrics:
            found = values(run_dirs, metric)
            mean, std, ci = mean_std_ci(found) if found else (None, None, None)
            row[f"{metric}_mean"], row[f"{metric}_std"], row[f"{metric}_ci95"] = mean, std, ci
            if base is not None:
                row[f"{metric}_p"] = (None if key == base
                                      else welch_p(found, values(groups[base], metric)))
        for metric in ("tokens_per_s", "seconds"):
            found = values(run_dirs, metric)
            row[metric] = sum(found) / len(found) if found else None
        row["run_dirs"] = " ".join(r.name for r in run_dirs)
        rows.append(row)
    return rows


def as_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):  # four significant digits, but never an exponent for big ones
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def markdown(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(as_text(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: Path, rows: list[dict], best: str | None = None) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (sweep_dir / "summary.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(markdown(rows) + (f"\n{best}\n" if best else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="txtrain-summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep's folder (multirun/<date>/<time>)")
    parser.add_argument("--baseline", metavar="OVERRIDES",
                        help='the group to test the others against (Welch\'s t-test), by its '
                             'overrides: --baseline "optim.lr=1e-3"')
    args = parser.parse_args(argv)
    sweep_dir = args.sweep_dir
    runs = find_runs(sweep_dir) if sweep_dir.is_dir() else {}
    if not runs:
        print(f"error: no runs (folders with metrics.jsonl) under {sweep_dir}", file=sys.stderr)
        sys.exit(2)
    if args.baseline is not None and SEED not in varying(runs):
        print("error: --baseline needs runs that differ in seed (a sweep over seed=0,1,2)",
              file=sys.stderr)
        sys.exit(2)
    try:
        rows = (grouped_rows(sweep_dir, args.baseline) if SEED in varying(runs)
                else summary_rows(sweep_dir))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    best = best_trial(sweep_dir, rows)
    write_summary(sweep_dir, rows, best)
    print(markdown(rows) + (f"\n{best}\n" if best else ""), end="")


if __name__ == "__main__":
    main()
