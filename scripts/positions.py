"""Which positional scheme generalizes past the lengths seen in training?

Trains the reverse task (``experiment=positions``) on strings of 1..L symbols, for each architecture (the GPT and the
encoder-decoder) and each ``model.pos`` (learned, sinusoidal, rope, none), then measures greedy
exact match at every length 1..2L: lengths up to L were trained on, L+1..2L never seen.

    python scripts/positions.py [--train-len 8] [--steps 600] [--out docs] [overrides...]

Writes ``positions.json``, ``positions.md`` (the table) and ``positions.png`` into ``--out``.
The learned position table is sized for every evaluated length (``model.max_seq_len`` covers
2L), so its rows past the trained ones exist but were never trained: that is what it is
measured on. Asked for a length past its table, a run is refused before it starts.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from txtrain.cli import compose_config
from txtrain.config import SyntheticTaskConfig
from txtrain.tasks.synthetic import SyntheticTask
from txtrain.train import Trainer

# Each architecture with its own recipe: the GPT's (cosine), and the 2017 paper's (noam, label
# smoothing 0.1, as experiment=transformer sets them).
ARCHS = {"gpt": ["model=tiny"],
         "encoder_decoder": ["model=transformer-tiny", "schedule=noam", "train.label_smoothing=0.1"]}
SCHEMES = ("learned", "sinusoidal", "rope", "none")
EVAL_EXAMPLES = 200  # per length (fewer where the length has fewer distinct strings)


def exact_match_by_length(trainer: Trainer, train_cfg: SyntheticTaskConfig, lengths: range) -> dict[int, float]:
    """Greedy exact match on fresh strings of each length (the task's teacher-forced check,
    which equals decoding token by token)."""
    model = trainer.model.eval()
    forward = lambda *args: model(*args)  # noqa: E731 (the task's evaluate takes a callable)
    scores = {}
    for n in lengths:
        n_eval = min(EVAL_EXAMPLES, train_cfg.n_symbols ** n // 2)
        cfg = SyntheticTaskConfig(name=train_cfg.name, n_symbols=train_cfg.n_symbols, min_len=n,
                                  max_len=n, n_eval=n_eval)
        task = SyntheticTask(cfg, seed=0, seq2seq=trainer.task.seq2seq)
        with torch.no_grad():
            scores[n] = task.evaluate(forward, batch_size=500)["exact_match"]
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-len", type=int, default=8)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    L = args.train_len
    work = Path(tempfile.mkdtemp(prefix="positions-"))
    results = []
    for arch in args.archs:
        for pos in args.schemes:
            cfg = compose_config(
                "experiment=positions", *ARCHS[arch], f"task.max_len={L}", f"task.eval_min_len={L + 1}",
                f"task.eval_max_len={2 * L}", f"model.pos={pos}", f"train.steps={args.steps}",
                "train.save_every=0", "train.log_every=100", "progress=false", "plot=false", *args.overrides)
            trainer = Trainer(cfg, work / f"{arch}-{pos}")
            summary = trainer.fit()
            by_length = exact_match_by_length(trainer, cfg.task, range(1, 2 * L + 1))
            results.append({"arch": arch, "pos": pos, "train_loss": summary["loss"],
                            "exact_match": {str(n): v for n, v in by_length.items()}})
            seen = sum(by_length[n] for n in range(1, L + 1)) / L
            unseen = sum(by_length[n] for n in range(L + 1, 2 * L + 1)) / L
            print(f"{arch:16s} {pos:10s} lengths 1..{L}: {seen:.3f}  {L + 1}..{2 * L}: {unseen:.3f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "positions.json").write_text(json.dumps(
        {"train_len": L, "steps": args.steps, "results": results}, indent=1) + "\n")
    (args.out / "positions.md").write_text(table(results, L))
    plot(results, L, args.out / "positions.png")
    print(f"wrote {args.out / 'positions.md'} and positions.png")


def table(results: list[dict], L: int) -> str:
    lengths = sorted({L, L + 1, L + 2, 3 * L // 2, 2 * L})
    head = ("| model | pos | trained 1..%d | " % L + " | ".join(f"length {n}" for n in lengths)
            + f" | unseen {L + 1}..{2 * L} |")
    lines = [head, "|" + "---|" * (len(lengths) + 4)]
    for r in results:
        em = {int(n): v for n, v in r["exact_match"].items()}
        seen = sum(em[n] for n in range(1, L + 1)) / L
        unseen = sum(em[n] for n in range(L + 1, 2 * L + 1)) / L
        lines.append(f"| {r['arch']} | {r['pos']} | {seen:.2f} | "
                     + " | ".join(f"{em[n]:.2f}" for n in lengths) + f" | {unseen:.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], L: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["arch"] for r in results}, key=list(ARCHS).index)
    fig, axes = plt.subplots(1, len(archs), figsize=(5 * len(archs), 3.6), sharey=True, squeeze=False)
    for ax, arch in zip(axes[0], archs):
        for r in (r for r in results if r["arch"] == arch):
            lengths = sorted(int(n) for n in r["exact_match"])
            ax.plot(lengths, [r["exact_match"][str(n)] for n in lengths], marker="o", ms=3, label=r["pos"])
        ax.axvspan(L + 0.5, 2 * L + 0.5, color="0.92")
        ax.set_title(arch)
        ax.set_xlabel("string length (shaded: never trained on)")
    axes[0][0].set_ylabel("exact match")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
