"""Planned against measured peak memory per rank, for a grid of runs.

    python scripts/memory_table.py                       # small and gpt2 presets, the full grid
    python scripts/memory_table.py --models small --steps 2
    python scripts/memory_table.py --models tiny --strategies ddp --precisions fp32 --checkpointing off --steps 1

Each cell trains a few steps in a fresh process (two under torchrun for a strategy that runs
one process per device) and reports, per rank (the busiest): the planner's estimate, and the
measured peak. On CUDA that is ``torch.cuda.max_memory_allocated``. On a CPU there are two:
the allocator's own peak, read from a memory profile of the whole run (what the plan
predicts), and the process's peak resident size over the whole run (the OS's maximum
resident size), which adds the interpreter, the libraries and the C library's slack.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from txtrain.parallel import STRATEGIES  # no torch: the table's own process only starts others

MiB = 2**20


def cell_overrides(model: str, strategy: str, precision: str, checkpointing: bool) -> list[str]:
    return [f"model={model}", f"parallel={strategy}", f"precision={precision}",
            f"model.activation_checkpointing={str(checkpointing).lower()}"]


def run_cell(overrides: list[str], nproc: int, steps: int, extra: list[str]) -> list[dict]:
    with tempfile.TemporaryDirectory() as run_dir:
        args = ["--one", run_dir, "--steps", str(steps), "--", *overrides, *extra]
        if nproc > 1:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       f"--nproc-per-node={nproc}", __file__, *args]
        else:
            command = [sys.executable, __file__, *args]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                   PYTHONWARNINGS="ignore")
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode:
            raise SystemExit(f"{' '.join(overrides)} failed:\n{result.stderr[-3000:]}")
        ranks = json.loads((Path(run_dir) / "memory.json").read_text())
        for rank in ranks:
            allocator = Path(run_dir) / f"allocator_rank{rank['rank']}.json"
            rank["allocator_peak"] = json.loads(allocator.read_text()) if allocator.exists() else None
        return ranks


def one(run_dir: Path, steps: int, overrides: list[str]) -> None:
    """Train in this process (one rank of a torchrun job, maybe) under a memory profile."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from txtrain import distributed
    from txtrain.cli import compose_config
    from txtrain.train import Trainer

    distributed.join_job()  # under torchrun: every rank joins the process group
    cfg = compose_config("progress=false", "plot=false", f"train.steps={steps}", "train.log_every=1",
                         "train.save_every=0", "train.eval_batch_size=8", "task.n_eval=8",
                         *overrides)
    rank = int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cuda:
        trainer = Trainer(cfg, run_dir)
        trainer.fit()
        trainer.close()
        return
    # The profile's running total of allocations, from before the model exists: the
    # allocator's peak over the whole run (evaluation is kept tiny so training decides it).
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiled:
        trainer = Trainer(cfg, run_dir)
        trainer.fit()
    trace = run_dir / f"trace_rank{rank}.json"
    profiled.export_chrome_trace(str(trace))
    events = json.loads(trace.read_text())["traceEvents"]
    peak = max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")
    trace.unlink()
    (run_dir / f"allocator_rank{rank}.json").write_text(json.dumps(peak))
    trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["small", "gpt2"])
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=["none", "fsdp"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--checkpointing", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="more overrides for every run")
    args = parser.parse_args()
    if args.one:
        return one(args.one, args.steps, args.overrides)

    extra = [f"train.batch_size={args.batch_size}", *args.overrides]
    print(f"peak memory per rank (the busiest), MiB; every run: {' '.join(extra)}")
    print("| model | parallel | precision | checkpointing | planned | allocator peak | "
          "process peak | planned / allocator |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for model, strategy, precision, ckpt in itertools.product(
            args.models, args.strategies, args.precisions, [c == "on" for c in args.checkpointing]):
        nproc = 2 if STRATEGIES[strategy].placement.multi_process else 1
        ranks = run_cell(cell_overrides(model, strategy, precision, ckpt), nproc, args.steps, extra)
        top = max(ranks, key=lambda r: r["planned"]["peak"])
        planned, measured = top["planned"]["peak"], top["measured_peak"]
        allocator = max((r["allocator_peak"] or 0) for r in ranks) or None
        checked = allocator if allocator else measured
        label = f"{strategy} x{nproc}" if nproc > 1 else strategy
        print(f"| {model} | {label} | {precision} | {'on' if ckpt else 'off'} | "
              f"{planned / MiB:.1f} | {allocator / MiB if allocator else float('nan'):.1f} | "
              f"{measured / MiB:.1f} | {planned / checked:.2f} |", flush=True)


if __name__ == "__main__":
    main()
