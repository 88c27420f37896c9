"""Where a training step's time goes: torch.profiler's table of operators over a few of
txtrain's own steps (``Trainer.train_step``, the loop's body), for the config the overrides make.

    python scripts/step_profile.py [--steps N] [--rows N] [overrides...]

Without overrides it profiles the reference config of ``bench.py`` (which needs
``task.data.path=...``). Operators are grouped into matmuls, attention, loss, optimizer and the
rest, with their share of the step.
"""

from __future__ import annotations

import argparse
import tempfile

from torch.profiler import ProfilerActivity, profile

import bench
from txtrain.cli import compose_config
from txtrain.train import Trainer

GROUPS = {"matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul"),
          "attention": ("flash_attention", "efficient_attention", "aten::_softmax", "aten::masked_fill"),
          "loss": ("log_softmax", "nll_loss"),
          "optimizer": ("_foreach", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt", "_fused_adam"),
          "zeroing": ("aten::fill_", "aten::zero_"),
          "copies": ("aten::copy_",)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--no-defaults", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    overrides = ([] if args.no_defaults else bench.DEFAULTS) + args.overrides + ["progress=false"]
    cfg = compose_config(*overrides)
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="profile-"))

    def step(number: int) -> None:
        trainer.train_step(trainer.task.train_batch(number, cfg.train.batch_size), cfg.optim.lr)

    for number in range(2):  # warm-up: first-use costs are not the step's
        step(number)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for number in range(args.steps):
            step(number)
    events = prof.key_averages()
    device_time = "self_device_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=device_time, row_limit=args.rows))
    total = sum(getattr(e, device_time) for e in events)
    shares = {name: 0.0 for name in [*GROUPS, "other"]}
    for event in events:
        group = next((g for g, keys in GROUPS.items() if any(k in event.key for k in keys)), "other")
        shares[group] += getattr(event, device_time) / total
    print("share of step time: " + ", ".join(f"{name} {100 * share:.1f}%" for name, share in shares.items()))


if __name__ == "__main__":
    main()
