"""How fast does txtrain-prepare tokenize, and does training stay flat as the data grows?

    python scripts/data_bench.py --corpus <folder of .txt> [--mb 200] [--workers 1 2]
                                 [--train-tokens 1.2e6 1e9] [--tokenizer-file gpt2.tiktoken]

1. Prepare throughput: the corpus's .txt files, repeated into a temporary folder until it
   holds about ``--mb`` MB, are prepared with each ``--workers`` count (a fresh output each
   time; the command as a user runs it, in a fresh process). Reported: MB of input per second
   of wall time, and whether every worker count wrote the same bytes.
2. Training at scale: for each ``--train-tokens`` size, a synthetic llm.c shard set of that
   many tokens (shards of 100M tokens: random ids of the tokenizer's vocabulary in the first and last MB of each, the rest a
   sparse hole that reads as token 0, so no disk is spent) is trained on for ``--steps``
   steps by a small model, in a fresh process. Reported: its peak resident size (the kernel's
   count for the process, ru_maxrss) and its start-up (process start to the end of the first
   step, from run.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from txtrain.tasks.shards import HEADER_INTS  # noqa: E402

SHARD_TOKENS = 100_000_000


def repeated_corpus(corpus: Path, folder: Path, mb: float) -> int:
    """Copies of the corpus's files under ``folder`` until they reach ``mb`` MB; their bytes."""
    files = sorted(corpus.rglob("*.txt"))
    if not files:
        sys.exit(f"error: no .txt files under {corpus}")
    folder.mkdir(parents=True)
    total, copy = 0, 0
    while total < mb * 1e6:
        for file in files:
            target = folder / f"{copy:04d}" / file.name
            target.parent.mkdir(exist_ok=True)
            shutil.copyfile(file, target)
            total += target.stat().st_size
        copy += 1
    return total


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(folder.iterdir()):
        h.update(file.name.encode() + file.read_bytes())
    return h.hexdigest()[:16]


def prepare_throughput(args, work: Path) -> list[dict]:
    corpus = work / "corpus"
    n_bytes = repeated_corpus(args.corpus, corpus, args.mb)
    rows = []
    for workers in args.workers:
        out = work / f"prepared-{workers}"
        command = [prepare_command(), str(corpus), "--out", str(out), "--workers", str(workers),
                   "--no-progress", "--tokenizer", args.tokenizer]
        if args.tokenizer_file:
            command += ["--tokenizer-file", args.tokenizer_file]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        tokens = json.loads((out / "dataset.json").read_text())["tokens"]
        rows.append({"workers": workers, "input_mb": round(n_bytes / 1e6, 1), "seconds": round(seconds, 1),
                     "mb_per_s": round(n_bytes / 1e6 / seconds, 2), "tokens": tokens["train"] + tokens["val"],
                     "output": digest(out)})
        shutil.rmtree(out)
    return rows


def prepare_command() -> str:
    """The installed txtrain-prepare (beside this interpreter when it is a virtual env's)."""
    beside = Path(sys.executable).with_name("txtrain-prepare")
    return str(beside) if beside.is_file() else "txtrain-prepare"


def synthetic_shards(folder: Path, n_tokens: int, vocab: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    edge = 500_000  # tokens of real ids at each end of a shard
    for index, first in enumerate(range(0, n_tokens, SHARD_TOKENS)):
        count = min(SHARD_TOKENS, n_tokens - first)
        header = np.zeros(HEADER_INTS, dtype=np.int32)
        header[:3] = 20240520, 1, count
        with (folder / f"synthetic_train_{index:06d}.bin").open("wb") as file:
            file.write(header.tobytes())
            file.write(rng.integers(0, vocab, min(edge, count), dtype=np.uint16).tobytes())
            file.truncate(header.nbytes + 2 * count)
            if count > 2 * edge:
                file.seek(header.nbytes + 2 * (count - edge))
                file.write(rng.integers(0, vocab, edge, dtype=np.uint16).tobytes())
    val = np.zeros(HEADER_INTS, dtype=np.int32)
    val[:3] = 20240520, 1, 100_000
    with (folder / "synthetic_val_000000.bin").open("wb") as file:
        file.write(val.tobytes() + rng.integers(0, vocab, 100_000, dtype=np.uint16).tobytes())


def training_at_scale(args, work: Path) -> list[dict]:
    rows = []
    for n_tokens in args.train_tokens:
        folder = work / f"tokens-{n_tokens}"
        synthetic_shards(folder, int(n_tokens), 256 if args.tokenizer == "bytes" else 50257)
        run_dir = work / f"run-{n_tokens}"
        command = [sys.executable, "-m", "txtrain", "task=text", f"task.data.path={folder}",
                   f"task.tokenizer={args.tokenizer}", f"train.steps={args.steps}", "train.eval_every=0",
                   "train.save_every=0", "task.sample_tokens=0", "task.eval_tokens=2048", "progress=false",
                   "plot=false", f"hydra.run.dir={run_dir}", *args.overrides]
        if args.tokenizer_file:
            command.append(f"task.tokenizer_file={args.tokenizer_file}")
        log = work / f"run-{n_tokens}.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr)
            _, status, usage = os.wait4(process.pid, 0)  # reaped here, for the child's ru_maxrss
        if status != 0:
            sys.exit(f"error: the run on {n_tokens:.0f} tokens failed:\n{log.read_text()[-2000:]}")
        run = json.loads((run_dir / "run.json").read_text())
        rows.append({"tokens": int(n_tokens), "disk_gb": round(2 * n_tokens / 1e9, 2),
                     "peak_resident_mb": round(usage.ru_maxrss / 1024),
                     "startup_s": round(run["startup_s"], 2)})
        shutil.rmtree(folder)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, help="a folder of .txt files (prepare throughput)")
    parser.add_argument("--mb", type=float, default=200)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer", default="gpt2", help="gpt2 | bytes (the synthetic tokens' range too)")
    parser.add_argument("--tokenizer-file", default=None)
    parser.add_argument("--train-tokens", type=float, nargs="*", default=[1.2e6, 1e9])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="also write data_bench.json here")
    parser.add_argument("overrides", nargs="*", default=["model=tiny", "task.seq_len=256",
                                                         "train.batch_size=8"],
                        help="txtrain overrides for the training runs")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="data-bench-") as tmp:
        work = Path(tmp)
        result = {}
        if args.corpus:
            result["prepare"] = prepare_throughput(args, work)
            print("| workers | input MB | seconds | MB/s | tokens | output |\n|---|---|---|---|---|---|")
            for row in result["prepare"]:
                print(f"| {row['workers']} | {row['input_mb']} | {row['seconds']} | {row['mb_per_s']} | "
                      f"{row['tokens']:,} | {row['output']} |")
        if args.train_tokens:
            result["training"] = training_at_scale(args, work)
            print("| tokens | on disk (GB) | peak resident (MB) | start-up (s) |\n|---|---|---|---|")
            for row in result["training"]:
                print(f"| {row['tokens']:,} | {row['disk_gb']} | {row['peak_resident_mb']} | {row['startup_s']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "data_bench.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
