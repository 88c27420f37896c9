"""``txtrain-summary <sweep dir>``: one row per run of a sweep, its overrides against its results.

The table goes to the terminal as Markdown and into the sweep dir as ``summary.md`` and
``summary.csv``. Columns: the overrides that differ between runs, then the final training
loss, the best evaluation (highest exact_match, or lowest val_loss / eval_loss), tokens per
second and wall time. A run trained with ``train.patience`` shows its best checkpoint's step
and metric, as its run.json records them (the best by more than ``train.min_delta``: the
checkpoint ``txtrain-sample --best`` loads), and whether it stopped early.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import yaml

BEST = {"exact_match": max, "val_loss": min, "eval_loss": min}  # in this order of preference


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
    return [summarize(run_dir, overrides, keys) for run_dir, overrides in runs.items()]


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


def write_summary(sweep_dir: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with (sweep_dir / "summary.csv").open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    (sweep_dir / "summary.md").write_text(markdown(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="txtrain-summary", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="a sweep's folder (multirun/<date>/<time>)")
    sweep_dir = parser.parse_args(argv).sweep_dir
    rows = summary_rows(sweep_dir) if sweep_dir.is_dir() else []
    if not rows:
        print(f"error: no runs (folders with metrics.jsonl) under {sweep_dir}", file=sys.stderr)
        sys.exit(2)
    write_summary(sweep_dir, rows)
    print(markdown(rows), end="")


if __name__ == "__main__":
    main()
