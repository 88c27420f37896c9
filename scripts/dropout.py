"""Does dropout delay overfitting? The Socratic model on a small slice of the dialogues.

Trains ``experiment=dropout`` (the Socratic model narrowed to width 96, GPT-2 BPE) on the first ``--chars``
characters of the corpus at ``--data``, once per ``model.dropout``, for the same steps. The
slice is small so that the steps make many passes over it: enough to overfit. Validation is
the task's own held-out tail of the slice.

    python scripts/dropout.py --data <the dialogues> [--chars 20000] [--steps 250]
        [--dropouts 0.0 0.1 0.2 0.3 0.5] [--out docs] [--runs-dir DIR] [overrides...]

Offline, GPT-2's ranks come from a file: add ``task.tokenizer_file=<path>/gpt2.tiktoken``.
At each evaluation the loss is measured on the held-out tokens (``val_loss``) and, in the
same way (no dropout), on as many tokens from the start of the training text (``train_loss``):
the loss logged during training has dropout on, which hides how well the model fits the
training text. Writes ``dropout.json``, ``dropout.md`` (the table) and ``dropout.png`` (the
curves) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from txtrain.cli import compose_config
from txtrain.summary import read_jsonl
from txtrain.tasks.base import Evaluation
from txtrain.tasks.corpus import local_corpus
from txtrain.train import Trainer

DROPOUTS = (0.0, 0.1, 0.2, 0.3, 0.5)


def write_slice(data: Path, chars: int, folder: Path) -> Path:
    """The first ``chars`` characters of the corpus (its files in the task's order) as one
    file in ``folder``."""
    parts, left = [], chars
    for file in local_corpus(data).files:
        if left <= 0:
            break
        text = file.read_text(encoding="utf-8")[:left]
        parts.append(text)
        left -= len(text)
    path = folder / f"first-{chars}-chars.txt"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def measure_train_loss_too(trainer: Trainer) -> None:
    """Make the run's evaluation also report ``train_loss``: the loss, in evaluation mode, on
    as many consecutive windows from the start of the training tokens as validation reads,
    scored as the validation windows are (``Evaluation``), through the run's strategy."""
    task, evaluate = trainer.task, trainer.strategy.evaluate
    T, rows = task.cfg.seq_len, trainer.cfg.train.eval_batch_size
    n = min(len(task.val_starts()), (len(task.train_tokens) - 1) // T)
    batches = [np.arange(first, min(first + rows, n)) * T for first in range(0, n, rows)]
    training = Evaluation(len(batches), lambda i: task.windows(task.train_tokens, batches[i]), task.score,
                          lambda sums: {"train_loss": sums["loss_sum"] / sums["tokens"]}, task.totals)

    def evaluate_both(model, validation: Evaluation) -> dict[str, float]:
        return {**evaluate(model, validation), **evaluate(model, training)}

    trainer.strategy.evaluate = evaluate_both


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the dialogues: a folder of .txt files or one")
    parser.add_argument("--chars", type=int, default=20_000, help="train and validate on this many characters")
    parser.add_argument("--steps", type=int, help="steps of each run (default: the experiment's)")
    parser.add_argument("--dropouts", type=float, nargs="+", default=list(DROPOUTS))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--runs-dir", type=Path, help="where the runs go (default: a new temporary folder)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's threads; on a busy machine one wastes less time waiting than two")
    parser.add_argument("overrides", nargs="*", help="more overrides for every run, e.g. task.tokenizer_file=...")
    args = parser.parse_args()
    if not args.data.exists():
        parser.error(f"--data {args.data}: no such file or folder (the dialogues: .txt files)")
    torch.set_num_threads(args.threads)
    work = args.runs_dir or Path(tempfile.mkdtemp(prefix="dropout-"))
    data = write_slice(args.data, args.chars, work / "data")
    steps = [f"train.steps={args.steps}"] if args.steps else []
    results = []
    for p in args.dropouts:
        cfg = compose_config(
            "experiment=dropout", f"task.data.path={data}", f"task.cache_dir={work / 'cache'}",
            f"model.dropout={p}", "progress=false", "plot=false", *steps, *args.overrides)
        started = time.perf_counter()
        trainer = Trainer(cfg, work / f"dropout-{p}")
        measure_train_loss_too(trainer)
        trainer.fit()
        results.append(result(p, trainer.run_dir, time.perf_counter() - started))
        r = results[-1]
        print(f"dropout {p:.1f}: train {r['train_loss']:.3f} val {r['val_loss']:.3f} gap {r['gap']:.3f}, "
              f"best val {r['best_val_loss']:.3f} at step {r['best_step']}, {r['seconds']:.0f}s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    tokens_per_step, train_tokens = cfg.train.batch_size * cfg.task.seq_len, len(trainer.task.train_tokens)
    (args.out / "dropout.json").write_text(json.dumps(
        {"chars": args.chars, "steps": cfg.train.steps, "eval_every": cfg.train.eval_every,
         "train_tokens": train_tokens, "val_tokens": len(trainer.task.val_tokens),
         "tokens_per_step": tokens_per_step, "passes": cfg.train.steps * tokens_per_step / train_tokens,
         "overrides": args.overrides, "results": results}, indent=1) + "\n")
    (args.out / "dropout.md").write_text(table(results))
    plot(results, args.out / "dropout.png")
    print(f"runs in {work}; wrote {args.out / 'dropout.md'} and dropout.png")


def result(p: float, run_dir: Path, seconds: float) -> dict:
    evals = read_jsonl(run_dir / "eval.jsonl")
    logged = [m for m in read_jsonl(run_dir / "metrics.jsonl") if m.get("loss") is not None]
    best = min(evals, key=lambda e: e["val_loss"])
    last = evals[-1]
    return {"dropout": p, "train_loss": last["train_loss"], "val_loss": last["val_loss"],
            "gap": last["val_loss"] - last["train_loss"], "best_val_loss": best["val_loss"],
            "best_step": best["step"], "still_improving": best is last,
            "logged_train_loss": logged[-1]["loss"], "seconds": seconds,
            "evals": [{k: e[k] for k in ("step", "train_loss", "val_loss")} for e in evals],
            "logged": [{"step": m["step"], "loss": m["loss"]} for m in logged]}


def table(results: list[dict]) -> str:
    lines = ["| dropout | train loss | val loss | gap (val - train) | best val loss | val stopped improving at |",
             "|---|---|---|---|---|---|"]
    for r in results:
        turn = "still improving" if r["still_improving"] else f"step {r['best_step']}"
        lines.append(f"| {r['dropout']:.1f} | {r['train_loss']:.3f} | {r['val_loss']:.3f} | {r['gap']:.3f} | "
                     f"{r['best_val_loss']:.3f} | {turn} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    from txtrain.plots import new_figure, save

    fig = new_figure(10, 3.8)
    val_ax, train_ax = fig.subplots(1, 2)
    for i, r in enumerate(results):
        color, label = f"C{i}", f"dropout {r['dropout']:.1f}"
        steps = [e["step"] for e in r["evals"]]
        val_ax.plot(steps, [e["val_loss"] for e in r["evals"]], color=color, marker="o", ms=2.5, label=label)
        best = min(r["evals"], key=lambda e: e["val_loss"])
        val_ax.plot([best["step"]], [best["val_loss"]], color=color, marker="v", ms=8)
        train_ax.plot(steps, [e["train_loss"] for e in r["evals"]], color=color, marker="o", ms=2.5, label=label)
        train_ax.plot([m["step"] for m in r["logged"]], [m["loss"] for m in r["logged"]], color=color,
                      alpha=0.3, linewidth=0.8)
    val_ax.set_title("validation loss (triangle: its minimum)", fontsize=10)
    train_ax.set_title("training loss: measured without dropout; faint: as logged", fontsize=10)
    for ax in (val_ax, train_ax):
        ax.set_xlabel("step")
    val_ax.set_ylabel("loss")
    val_ax.legend(fontsize=8)
    save(fig, path)


if __name__ == "__main__":
    main()
