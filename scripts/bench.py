"""How fast does txtrain train, and how close is that to what the machine can do?

    python scripts/bench.py [--steps N] [--warmup N] [--pairs N] [--no-reference] [overrides...]

The overrides are txtrain's own (``task=text task.data.path=... model.n_layer=6``). For each of
``--pairs`` rounds, txtrain (the real command, in a fresh process) and the plain-PyTorch loop
of ``reference.py`` (same model, same data) each train ``warmup + steps`` steps; the order
alternates, so drift in the machine's speed hits both alike. Reported, as one line and as
``bench.json`` in ``--out``:

- tokens/s and ms per step (median over the timed steps, and their spread), for both loops,
  and txtrain / reference, per pair and the median;
- model FLOPs per token, the FLOP/s achieved and the MFU: that over the peak of a matmul probe
  run in this invocation on the same device and dtype (and, on a known GPU, over the vendor's
  dense peak too);
- peak memory (CPU: the process's peak resident size; CUDA: the allocator's peak);
- the share of step time txtrain spent waiting for data, and its start-up time (process start
  to the end of the first step);
- an interleaved comparison: in this process, txtrain's step (``Trainer.train_step`` on the
  task's batch) and the reference's step take turns, one step each, starting from the same
  weights. Whole runs on a shared machine drift by 10-20% from one minute to the next; steps
  taken in turns see the same machine, so their ratio is the precise one. The two loops'
  losses are reported side by side: they must agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from txtrain import runinfo
from txtrain.cli import compose_config
from txtrain.config import Config
from txtrain.model import Transformer
from txtrain.optim import lr_factor
from txtrain.tasks import build_task

SCRIPTS = Path(__file__).resolve().parent
# The reference config: a 6-layer, 384-wide GPT on 256-token windows, batch 8.
DEFAULTS = ["task=text", "model.n_layer=6", "model.n_head=6", "model.n_embd=384", "task.seq_len=256",
            "train.batch_size=8", "train.micro_batch_size=8", "precision=fp32", "model.dropout=0"]
# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, FLOP/s.
VENDOR_PEAKS = {"H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},  # fp32 = TF32
                "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},
                "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiling, caches)")
    parser.add_argument("--pairs", type=int, default=3, help="rounds of txtrain + reference")
    parser.add_argument("--no-reference", action="store_true", help="time txtrain only")
    parser.add_argument("--interleaved-steps", type=int, default=12,
                        help="steps of each loop taken in turns in this process (0: none)")
    parser.add_argument("--no-defaults", action="store_true",
                        help="start from txtrain's defaults, not the reference config")
    parser.add_argument("--out", type=Path, help="where runs and bench.json go")
    parser.add_argument("overrides", nargs="*", help="txtrain overrides")
    args = parser.parse_args()
    overrides = ([] if args.no_defaults else DEFAULTS) + args.overrides
    out = args.out or Path("outputs/bench") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    result = bench(overrides, args.steps, args.warmup, args.pairs, not args.no_reference, out,
                   args.interleaved_steps)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    print(one_line(result))
    print(f"details: {out / 'bench.json'}")


def bench(overrides: list[str], steps: int, warmup: int, pairs: int, with_reference: bool,
          out: Path, interleaved_steps: int = 0) -> dict:
    overrides = [*overrides, f"train.steps={warmup + steps}", "train.log_every=1", "train.eval_every=0",
                 "train.save_every=0", "progress=false"]
    cfg = compose_config(*overrides)
    if cfg.task.name == "text":  # the evaluation after the last step: keep it short
        overrides.append(f"task.eval_tokens={cfg.task.seq_len}")
    task = build_task(cfg.task, cfg.seed, progress=False)  # also fills the token cache
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device
    device = "cpu" if device == "auto" else device
    why_not = reference_mismatch(cfg) if with_reference else "not asked for"
    reference_args = None
    if why_not is None:
        np.save(out / "train_tokens.npy", task.train_tokens.read(0, len(task.train_tokens)))
        reference_args = reference_command(cfg, task.vocab_size, device, out)

    dtype = str(cfg.precision.name)
    peaks = [matmul_peak(device, dtype)]
    runs: dict[str, list[dict]] = {"txtrain": [], "reference": []}
    for pair in range(pairs):
        order = ["txtrain", "reference"] if pair % 2 == 0 else ["reference", "txtrain"]
        for side in order:
            if side == "txtrain":
                runs["txtrain"].append(run_txtrain(overrides, out / f"txtrain-{pair}", warmup))
            elif reference_args is not None:
                runs["reference"].append(run_reference(reference_args, out / f"reference-{pair}.json", warmup))
        print(f"pair {pair + 1}/{pairs}: " + ", ".join(
            f"{side} {runs[side][-1]['tokens_per_s']:.0f} tok/s" for side in order if runs[side]), flush=True)
    peaks.append(matmul_peak(device, dtype))  # before and after: the machine drifts

    flops = flops_per_token(cfg, task.vocab_size)
    peak = max(peaks)
    result = {"overrides": overrides, "device": device_name(device), "dtype": dtype,
              "flops_per_token": flops, "matmul_peak_flops": peak, "matmul_peak_runs": peaks,
              "txtrain": summarize(runs["txtrain"], flops, peak, device, dtype)}
    if runs["reference"]:
        result["reference"] = summarize(runs["reference"], flops, peak, device, dtype)
        ratios = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs["txtrain"], runs["reference"])]
        result["ratio_per_pair"] = ratios
        result["ratio"] = statistics.median(ratios)
    else:
        result["reference_skipped"] = why_not
    if reference_args is not None and interleaved_steps > 0:
        result["interleaved"] = take_turns(cfg, warmup, interleaved_steps, out / "interleaved")
    return result


def take_turns(cfg: Config, warmup: int, steps: int, run_dir: Path) -> dict:
    """txtrain's and the reference's training steps in turns, in this process, from the same
    initial weights: their times' ratio without the machine's drift, and both losses."""
    from txtrain.train import Trainer

    reference = load_reference()
    trainer = Trainer(cfg, run_dir)  # the allocator setting, as in a txtrain process
    torch.manual_seed(cfg.seed)  # the trainer's initial weights, again
    gpt = reference_with_weights(reference, Transformer(cfg.model, trainer.task.vocab_size),
                                 trainer.task.vocab_size).to(trainer.device)
    args = argparse.Namespace(**{key.replace("-", "_"): value for key, value in reference_settings(
        cfg, trainer.task.vocab_size, trainer.device.type).items()}, compile=cfg.compile)
    batches = ((batch.inputs, batch.targets) for batch in (trainer.task.train_batch(step, cfg.train.batch_size)
                                                          for step in range(warmup + steps)))
    their_steps = reference.train(gpt, reference.make_optimizer(gpt, args), batches, args)
    times: dict[str, list[float]] = {"txtrain": [], "reference": []}
    losses: dict[str, list[float]] = {"txtrain": [], "reference": []}
    for step in range(warmup + steps):
        for side in (("txtrain", "reference") if step % 2 == 0 else ("reference", "txtrain")):
            start = time.perf_counter()
            if side == "txtrain":
                batch = trainer.task.train_batch(step, cfg.train.batch_size)
                lr = cfg.optim.lr * lr_factor(cfg.schedule, step, cfg.train.steps)
                loss = trainer.train_step(batch, lr)[0].item()
            else:
                loss = next(their_steps)[0]
            times[side].append(time.perf_counter() - start)
            losses[side].append(loss)
    ratios = [theirs / ours for ours, theirs in zip(times["txtrain"][warmup:], times["reference"][warmup:])]
    return {"ratio": statistics.median(times["reference"][warmup:]) / statistics.median(times["txtrain"][warmup:]),
            "ratio_per_step": ratios, "step_ms": {side: [1000 * t for t in ts] for side, ts in times.items()},
            "losses": losses}


def reference_mismatch(cfg: Config) -> str | None:
    """Why reference.py cannot train this config (None: it can)."""
    m = cfg.model
    checks = {
        "task is not a text task": cfg.task.name != "text",
        "parallel is not none": str(cfg.parallel.name) != "none",
        "the model is not GPT-2-like (learned positions, pre-norm, GELU, biases, tied embeddings, "
        "d_ff = 4 x width, no dropout)": (str(m.pos), str(m.norm), str(m.activation), m.bias,
                                          m.tie_embeddings, m.d_ff, m.dropout)
        != ("learned", "pre", "gelu", True, True, None, 0.0),
        "activation checkpointing is on": m.activation_checkpointing,
        "the batch is split into micro-batches": (cfg.train.micro_batch_size or cfg.train.batch_size)
        != cfg.train.batch_size,
        "the optimizer is not adamw": str(cfg.optim.name) != "adamw",
        "the schedule is not cosine": str(cfg.schedule.name) != "cosine",
        "label smoothing is on": cfg.train.label_smoothing > 0,
    }
    reasons = [reason for reason, applies in checks.items() if applies]
    return "; ".join(reasons) or None


def reference_settings(cfg: Config, vocab_size: int, device: str) -> dict:
    """reference.py's options for this config."""
    m, o = cfg.model, cfg.optim
    return {"vocab-size": vocab_size, "vocab-multiple": m.vocab_multiple, "n-layer": m.n_layer,
            "n-head": m.n_head, "n-embd": m.n_embd, "seq-len": cfg.task.seq_len,
            "batch-size": cfg.train.batch_size, "steps": cfg.train.steps, "impl": str(m.impl),
            "precision": str(cfg.precision.name), "lr": o.lr, "weight-decay": o.weight_decay,
            "beta1": o.beta1, "beta2": o.beta2, "eps": o.eps, "grad-clip": cfg.train.grad_clip,
            "warmup-steps": cfg.schedule.warmup_steps, "min-lr-ratio": cfg.schedule.min_lr_ratio,
            "device": device, "seed": cfg.seed}


def reference_command(cfg: Config, vocab_size: int, device: str, out: Path) -> list[str]:
    options = [str(part) for key, value in reference_settings(cfg, vocab_size, device).items()
               for part in (f"--{key}", value)]
    return [sys.executable, str(SCRIPTS / "reference.py"), "--tokens", str(out / "train_tokens.npy"),
            *options, *(["--compile"] if cfg.compile else [])]


def load_reference():
    spec = importlib.util.spec_from_file_location("reference", SCRIPTS / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_with_weights(reference, model: Transformer, vocab_size: int) -> torch.nn.Module:
    """The reference GPT holding ``model``'s weights (its q, k, v projections as one)."""
    cfg = model.cfg
    gpt = reference.GPT(vocab_size, model.token_embedding.num_embeddings, cfg.max_seq_len, cfg.n_layer,
                        cfg.n_head, cfg.n_embd, str(cfg.impl))
    ours = model.state_dict()
    theirs = {"wte.weight": ours["token_embedding.weight"], "wpe.weight": ours["positions.table.weight"],
              "ln_f.weight": ours["final_norm.weight"], "ln_f.bias": ours["final_norm.bias"],
              "head.weight": ours["head.weight"]}
    for i in range(cfg.n_layer):
        block = f"blocks.{i}."
        for kind in ("weight", "bias"):
            theirs[block + f"ln1.{kind}"] = ours[block + f"attn_norm.{kind}"]
            theirs[block + f"ln2.{kind}"] = ours[block + f"ffn_norm.{kind}"]
            theirs[block + f"attn.qkv.{kind}"] = torch.cat([ours[block + f"attn.query.{kind}"],
                                                            ours[block + f"attn.key_value.{kind}"]])
            theirs[block + f"attn.proj.{kind}"] = ours[block + f"attn.out.{kind}"]
            theirs[block + f"mlp.0.{kind}"] = ours[block + f"ffn.up.{kind}"]
            theirs[block + f"mlp.2.{kind}"] = ours[block + f"ffn.down.{kind}"]
    gpt.load_state_dict(theirs)
    return gpt


def run_txtrain(overrides: list[str], run_dir: Path, warmup: int) -> dict:
    command = [sys.executable, "-m", "txtrain", *overrides, f"hydra.run.dir={run_dir}", "resume=never"]
    max_rss = run(command, run_dir.with_suffix(".log"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > warmup]
    memory = json.loads((run_dir / "memory.json").read_text())[0]
    on_cuda = memory["measured_by"].startswith("torch.cuda")
    return {"step_seconds": [r["step_ms"] / 1000 for r in timed],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "data_wait": statistics.mean(r["data_wait"] for r in timed),
            "startup_s": json.loads((run_dir / "run.json").read_text()).get("startup_s"),
            "peak_memory_bytes": memory["measured_peak"] if on_cuda else max_rss,
            # txtrain's own figures: its measured peak (CUDA: over training steps only; CPU: the
            # process's whole run, as max_rss) and what its planner predicted
            "training_peak_bytes": memory["measured_peak"], "planned_peak_bytes": memory["planned"]["peak"],
            "losses": [r["loss"] for r in records]}


def run_reference(command: list[str], result_file: Path, warmup: int) -> dict:
    max_rss = run([*command, "--json", str(result_file)], result_file.with_suffix(".log"))
    result = json.loads(result_file.read_text())
    seconds = result["step_seconds"][warmup:]
    on_cuda = command[command.index("--device") + 1].startswith("cuda")
    return {"step_seconds": seconds, "tokens_per_s": result["tokens_per_step"] / statistics.median(seconds),
            "peak_memory_bytes": result["peak_memory_bytes"] if on_cuda else max_rss,
            "losses": result["losses"]}


def run(command: list[str], log_file: Path) -> int:
    """Run ``command`` to the end (its output into ``log_file``); its peak resident size in bytes."""
    with log_file.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env=dict(os.environ, PYTHONWARNINGS="ignore"))
        _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: {Path(command[1]).name} {' '.join(command[2:5])} ... failed; see {log_file}")
    return usage.ru_maxrss * 1024  # Linux reports KiB


def summarize(runs: list[dict], flops: float, peak: float, device: str, dtype: str) -> dict:
    seconds = [s for run in runs for s in run["step_seconds"]]
    tokens_per_s = statistics.median(run["tokens_per_s"] for run in runs)
    achieved = flops * tokens_per_s
    summary = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_run": [run["tokens_per_s"] for run in runs],
               "step_ms_median": 1000 * statistics.median(seconds),
               "step_ms_p10_p90": [1000 * float(np.percentile(seconds, q)) for q in (10, 90)],
               "achieved_flops": achieved, "mfu": achieved / peak,
               "peak_memory_bytes": max(run["peak_memory_bytes"] for run in runs)}
    vendor = vendor_peak(device, dtype)
    if vendor:
        summary["mfu_vendor_peak"] = achieved / vendor
    for key in ("data_wait", "startup_s", "training_peak_bytes", "planned_peak_bytes"):
        values = [run[key] for run in runs if run.get(key) is not None]
        if values:
            summary[key] = statistics.median(values)
    return summary


def flops_per_token(cfg: Config, vocab_size: int) -> float:
    """Model FLOPs per trained token, forward and backward (PaLM's appendix B): 6 per weight
    of every matmul (the head included, tied or not) plus 12 * layers * seq_len * width for the
    attention scores and their weighted sum. Padded vocabulary rows do not count."""
    m = cfg.model
    d, layers, seq = m.n_embd, m.n_layer, cfg.task.seq_len if cfg.task.name == "text" else m.max_seq_len
    matmul_weights = layers * (4 * d * d + 2 * d * m.ffn_width) + vocab_size * d
    return 6 * matmul_weights + 12 * layers * seq * d


def matmul_peak(device: str, dtype: str) -> float:
    """The best FLOP/s of square matmuls on this device and dtype, measured now."""
    sizes = (8192,) if device.startswith("cuda") else (1024, 2048)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
        b = torch.randn(n, n, device=device, dtype=DTYPES[dtype])
        for _ in range(3):
            a @ b
        repeats = max(3, int(2e10 / (2 * n**3))) if device == "cpu" else 50
        synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        synchronize(device)
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start))
    return best


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_name(device: str) -> str:
    return runinfo.device_name(torch.device(device)) + f", {torch.get_num_threads()} CPU threads"


def vendor_peak(device: str, dtype: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name()
    return next((peaks[dtype] for gpu, peaks in VENDOR_PEAKS.items() if gpu in name), None)


def one_line(result: dict) -> str:
    ours = result["txtrain"]
    line = (f"txtrain {ours['tokens_per_s']:,.0f} tok/s ({ours['step_ms_median']:.0f} ms/step, "
            f"p10-p90 {ours['step_ms_p10_p90'][0]:.0f}-{ours['step_ms_p10_p90'][1]:.0f})")
    if "reference" in result:
        ref = result["reference"]
        line += (f", reference {ref['tokens_per_s']:,.0f} tok/s: ratio {result['ratio']:.3f} "
                 f"(pairs {', '.join(f'{r:.3f}' for r in result['ratio_per_pair'])})")
    line += (f"; {result['flops_per_token'] / 1e6:.0f} MFLOP/token, {ours['achieved_flops'] / 1e9:,.1f} "
             f"GFLOP/s, MFU {ours['mfu']:.2f} of {result['matmul_peak_flops'] / 1e9:,.1f} GFLOP/s "
             f"measured ({result['dtype']} matmul)")
    if "mfu_vendor_peak" in ours:
        line += f", {ours['mfu_vendor_peak']:.2f} of the data sheet's peak"
    if "reference" in result:
        line += f"; reference MFU {result['reference']['mfu']:.2f}"
    if "interleaved" in result:
        turns = result["interleaved"]
        line += (f"; steps in turns: ratio {turns['ratio']:.3f} (per step, median "
                 f"{statistics.median(turns['ratio_per_step']):.3f})")
    line += f"; peak memory {ours['peak_memory_bytes'] / 2**30:.2f} GiB"
    if "reference" in result:
        line += f" (reference {result['reference']['peak_memory_bytes'] / 2**30:.2f})"
    line += f"; data wait {100 * ours['data_wait']:.2f}% of step time"
    if "startup_s" in ours:
        line += f"; start-up {ours['startup_s']:.1f} s to the first step"
    return line


if __name__ == "__main__":
    main()
