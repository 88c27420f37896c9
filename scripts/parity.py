"""Parity table: how closely each parallel strategy reproduces the single-process run.

Trains the same short run (fp32, no dropout, same seed and global batch) under parallel=none
and under every strategy, then prints, per strategy, the largest relative difference of a
step's loss and the relative difference of the final weights (as one vector).

    python scripts/parity.py                 # 30 steps on CPU with gloo
    python scripts/parity.py --steps 100 --extra model=small task.max_len=32
    python scripts/parity.py --strategies fsdp "pipeline 1f1b"
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from txtrain.checkpoint import Checkpoints, load_model_weights
from txtrain.config import ModelConfig
from txtrain.model import build_model
from txtrain.resume import CheckpointMeta

STRATEGIES = {  # name: (overrides, processes)
    "ddp": (["parallel=ddp"], 2),
    "ddp + accumulation": (["parallel=ddp", "train.micro_batch_size=16"], 2),
    "fsdp": (["parallel=fsdp"], 2),
    "fsdp, kept gathered": (["parallel=fsdp", "parallel.reshard_after_forward=false"], 2),
    "fsdp hybrid 2x2": (["parallel=fsdp", "parallel.replicate=2"], 4),
    "pipeline gpipe": (["parallel=pipeline", "parallel.schedule=gpipe"], 2),
    "pipeline 1f1b": (["parallel=pipeline", "parallel.schedule=1f1b"], 2),
    "pipeline interleaved": (["parallel=pipeline", "parallel.schedule=interleaved",
                              "parallel.stages_per_rank=2"], 2),
}


def train(run_dir: Path, overrides: list[str], nproc: int) -> None:
    launcher = [sys.executable, "-m", "txtrain"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}", "-m", "txtrain"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run([*launcher, "plot=false", *overrides, f"hydra.run.dir={run_dir}"], env=env,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(overrides)} failed:\n{result.stderr[-3000:]}")


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def weights(run_dir: Path) -> torch.Tensor:
    checkpoint = Checkpoints(run_dir / "checkpoints").latest()
    meta = CheckpointMeta.load(checkpoint)
    model = build_model(ModelConfig(**meta.model_config), meta.vocab_size)
    load_model_weights(checkpoint, model)
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run")
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=list(STRATEGIES),
                        metavar="NAME", help="rows of the table (default: all)")
    args = parser.parse_args()
    common = [f"train.steps={args.steps}", "train.log_every=1", "train.eval_every=0",
              "task.n_eval=100", "model.n_layer=4", "model.tie_embeddings=false",
              "model.dropout=0", "precision=fp32", "progress=false", *args.extra]
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "none"
        train(reference, common, 1)
        ref_losses, ref_weights = losses(reference), weights(reference)
        print(f"| strategy | processes | max relative loss difference ({args.steps} steps) "
              "| final weights, relative difference |")
        print("|---|---|---|---|")
        for i, name in enumerate(args.strategies):
            overrides, nproc = STRATEGIES[name]
            run_dir = Path(tmp) / str(i)
            train(run_dir, [*overrides, *common], nproc)
            got = losses(run_dir)
            worst = max(abs(got[s] - ref_losses[s]) / abs(ref_losses[s]) for s in ref_losses)
            drift = float((weights(run_dir) - ref_weights).norm() / ref_weights.norm())
            print(f"| {name} | {nproc} | {worst:.1e} | {drift:.1e} |", flush=True)


if __name__ == "__main__":
    main()
