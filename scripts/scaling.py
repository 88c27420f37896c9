"""How speed and memory scale: with sequence length (manual vs sdpa attention), with model size,
and with torch.compile. Every point is one ``bench.py`` measurement of txtrain.

    python scripts/scaling.py [--steps N] [--out docs] [overrides...]
    python scripts/scaling.py --tables seq_len --seq-lens 256 --impls sdpa [overrides...]   (one point)

The overrides (``task.data.path=... task.tokenizer_file=...``) apply to every point. Writes
``scaling.md`` (the tables) and ``scaling.png`` (the plots) into ``--out``. Sequence-length
points keep the tokens per step fixed (batch x length = 2048), so the attention's share is all
that changes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import bench

TOKENS_PER_STEP = 2048
REFERENCE_MODEL = ["model.n_layer=6", "model.n_head=6", "model.n_embd=384", "model.max_seq_len=1024"]
TABLES = ("seq_len", "size", "compile")
SEQ_LENS = (128, 256, 512, 1024)
IMPLS = ("manual", "sdpa")
SIZES = {"tiny": ["model=tiny"], "small": ["model=small"], "base": ["model=base"],
         "6x384": REFERENCE_MODEL, "gpt2": ["model=gpt2", "train.batch_size=4", "train.micro_batch_size=4"]}
COMMON = ["task=text", "precision=fp32", "model.dropout=0", "task.seq_len=256", "train.batch_size=8",
          "train.micro_batch_size=8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    parser.add_argument("--seq-lens", nargs="+", type=int, default=list(SEQ_LENS))
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="scaling-"))
    rows = {table: [] for table in TABLES}

    def measure(kind: str, label: dict, overrides: list[str], warmup: int = args.warmup) -> None:
        folder = work / f"{kind}-{len(rows[kind])}"
        folder.mkdir()
        result = bench.bench(COMMON + overrides + args.overrides, args.steps, warmup, 1, False, folder)
        ours = result["txtrain"]
        rows[kind].append({**label, "tokens_per_s": ours["tokens_per_s"], "mfu": ours["mfu"],
                           "peak_gib": ours["training_peak_bytes"] / 2**30,
                           "planned_gib": ours["planned_peak_bytes"] / 2**30,
                           "mflop_per_token": result["flops_per_token"] / 1e6})
        print(kind, label, f"{ours['tokens_per_s']:.0f} tok/s, {rows[kind][-1]['peak_gib']:.2f} GiB",
              flush=True)

    for seq_len in args.seq_lens if "seq_len" in args.tables else ():
        batch = TOKENS_PER_STEP // seq_len
        for impl in args.impls:
            measure("seq_len", {"seq_len": seq_len, "impl": impl},
                    REFERENCE_MODEL + [f"task.seq_len={seq_len}", f"model.impl={impl}",
                                       f"train.batch_size={batch}", f"train.micro_batch_size={batch}"])
    for name in args.sizes if "size" in args.tables else ():
        measure("size", {"model": name}, SIZES[name])
    for compiled in (False, True) if "compile" in args.tables else ():
        measure("compile", {"compile": compiled}, REFERENCE_MODEL + [f"compile={str(compiled).lower()}"],
                warmup=args.warmup + (2 if compiled else 0))

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "scaling.md").write_text(tables(rows))
    plot(rows, args.out / "scaling.png")
    print(tables(rows))


def tables(rows: dict) -> str:
    memory = "peak memory, GiB (planned)"
    lines = [f"| seq len | impl | tokens/s | MFU | {memory} |", "|---|---|---|---|---|"]
    lines += [f"| {r['seq_len']} | {r['impl']} | {r['tokens_per_s']:,.0f} | {r['mfu']:.2f} | {gib(r)} |"
              for r in rows["seq_len"]]
    lines += ["", f"| model | MFLOP/token | tokens/s | MFU | {memory} |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['mflop_per_token']:,.0f} | {r['tokens_per_s']:,.0f} | {r['mfu']:.2f} | "
              f"{gib(r)} |" for r in rows["size"]]
    lines += ["", f"| compile | tokens/s | MFU | {memory} |", "|---|---|---|---|"]
    lines += [f"| {'on' if r['compile'] else 'off'} | {r['tokens_per_s']:,.0f} | {r['mfu']:.2f} | {gib(r)} |"
              for r in rows["compile"]]
    return "\n".join(lines) + "\n"


def gib(row: dict) -> str:
    return f"{row['peak_gib']:.2f} ({row['planned_gib']:.2f})"


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, memory, size) = plt.subplots(1, 3, figsize=(13, 3.8))
    measured = sorted({r["seq_len"] for r in rows["seq_len"]})
    for impl, style, color in (("manual", "o--", "C0"), ("sdpa", "s-", "C1")):
        points = [r for r in rows["seq_len"] if r["impl"] == impl]
        lengths = [r["seq_len"] for r in points]
        speed.plot(lengths, [r["tokens_per_s"] for r in points], style, color=color, label=impl)
        memory.plot(lengths, [r["peak_gib"] for r in points], style, color=color, label=f"{impl}, measured")
        memory.plot(lengths, [r["planned_gib"] for r in points], ":", color=color, label=f"{impl}, planned")
    for axis, title in ((speed, "tokens/s"), (memory, "peak memory over training steps (GiB)")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(measured, [str(n) for n in measured])
        axis.set_xlabel(f"sequence length ({TOKENS_PER_STEP} tokens per step)")
        axis.set_title(title)
        axis.legend()
    size.bar([r["model"] for r in rows["size"]], [r["tokens_per_s"] for r in rows["size"]])
    size.set_yscale("log")
    size.set_title("tokens/s by model (seq 256)")
    for bar_row, x in zip(rows["size"], range(len(rows["size"]))):
        size.annotate(f"MFU {bar_row['mfu']:.2f}", (x, bar_row["tokens_per_s"]), ha="center", va="bottom",
                      fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
