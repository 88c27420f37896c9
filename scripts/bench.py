"""How fast does txtrain train, and how close is that to what the machine can do?

    python scripts/bench.py [--steps N] [--warmup N] [--pairs N] [--no-reference] [--nanogpt DIR] [overrides...]

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

``--nanogpt DIR`` (a checkout of karpathy/nanoGPT) adds its ``train.py``, run as it is, as a
third loop in the same turns: the same model (``model.bias`` either way; its position table
has ``block_size`` rows, so txtrain needs ``model.max_seq_len`` = ``task.seq_len``), batch,
device, dtype and ``compile``, on the tokens txtrain trains on, written as nanoGPT's data folder
(``train.bin``, ``val.bin`` and, except for GPT-2's encoding, which nanoGPT pads to 50304 by
itself, ``meta.pkl`` with the vocabulary size). Its step times are the ``time`` of the lines it
prints; its first iteration, which holds its evaluation, is never timed. Reported: its tokens/s,
txtrain / nanoGPT per pair and the median, and both processes' peak resident sizes (the OS's
max RSS) and their ratio. ``--no-reference`` leaves reference.py out. On a CPU txtrain keeps
freed memory by default (``keep_freed_memory``) and nanoGPT does not: that is in the RSS ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import re
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
from txtrain.tasks.tokenizers import GPT2_NAMES

SCRIPTS = Path(__file__).resolve().parent
# The reference config: a 6-layer, 384-wide GPT on 256-token windows, batch 8 (a position table
# of 256 rows, as reference.py and nanoGPT build it).
DEFAULTS = ["task=text", "model.n_layer=6", "model.n_head=6", "model.n_embd=384", "task.seq_len=256",
            "model.max_seq_len=256", "train.batch_size=8", "train.micro_batch_size=8", "precision=fp32",
            "model.dropout=0"]
# Dense (no sparsity) tensor-core peaks from the vendors' data sheets, FLOP/s.
VENDOR_PEAKS = {"H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},  # fp32 = TF32
                "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 495e12},
                "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12}}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NANOGPT_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# What nanoGPT's train.py prints after each iteration (its log_interval=1).
NANOGPT_ITERATION = re.compile(r"^iter (\d+): loss (\S+), time ([\d.]+) ?ms", re.MULTILINE)
# A run is started by this go-between, which imports no torch: on Linux a child started with
# vfork (as subprocess does) inherits, in its ru_maxrss, the high-water mark of the process that
# started it, here this one, torch loaded (tests/test_memory_measure.py). The grandchild's
# max RSS is its own; the go-between writes it to the file its first argument names.
GO_BETWEEN = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(str(usage.ru_maxrss * 1024))  # Linux reports KiB
sys.exit(os.waitstatus_to_exitcode(status))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiling, caches)")
    parser.add_argument("--pairs", type=int, default=3, help="rounds of txtrain and the other loops")
    parser.add_argument("--no-reference", action="store_true", help="leave reference.py out")
    parser.add_argument("--nanogpt", type=Path, metavar="DIR",
                        help="a checkout of karpathy/nanoGPT: its train.py joins the turns")
    parser.add_argument("--interleaved-steps", type=int, default=12,
                        help="steps of each loop taken in turns in this process (0: none)")
    parser.add_argument("--no-defaults", action="store_true",
                        help="start from txtrain's defaults, not the reference config")
    parser.add_argument("--out", type=Path, help="where runs and bench.json go")
    parser.add_argument("overrides", nargs="*", help="txtrain overrides")
    args = parser.parse_args()
    if args.nanogpt is not None:
        check_nanogpt(args.nanogpt)
    overrides = ([] if args.no_defaults else DEFAULTS) + args.overrides
    out = args.out or Path("outputs/bench") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    result = bench(overrides, args.steps, args.warmup, args.pairs, not args.no_reference, out,
                   args.interleaved_steps, args.nanogpt)
    (out / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    print(one_line(result))
    print(f"details: {out / 'bench.json'}")


def check_nanogpt(folder: Path) -> None:
    for name in ("train.py", "configurator.py"):  # train.py runs configurator.py
        if not (folder / name).is_file():
            sys.exit(f"error: --nanogpt {folder} has no {name}: give a checkout of karpathy/nanoGPT")


def bench(overrides: list[str], steps: int, warmup: int, pairs: int, with_reference: bool,
          out: Path, interleaved_steps: int = 0, nanogpt: Path | None = None) -> dict:
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
    if nanogpt is not None:
        cannot = nanogpt_mismatch(cfg, device)
        if cannot:
            sys.exit(f"error: nanoGPT cannot train this config: {cannot}")
        data_dir = nanogpt_data(task, out / "nanogpt-data")

    dtype = str(cfg.precision.name)
    peaks = [matmul_peak(device, dtype)]
    runs: dict[str, list[dict]] = {"txtrain": [], "reference": [], "nanogpt": []}
    sides = ["txtrain", "reference", "nanogpt"]
    for pair in range(pairs):
        order = sides if pair % 2 == 0 else sides[::-1]
        for side in order:
            if side == "txtrain":
                runs["txtrain"].append(run_txtrain(overrides, out / f"txtrain-{pair}", warmup))
            elif side == "reference" and reference_args is not None:
                runs["reference"].append(run_reference(reference_args, out / f"reference-{pair}.json", warmup))
            elif side == "nanogpt" and nanogpt is not None:
                settings = nanogpt_settings(cfg, device, data_dir, out / f"nanogpt-{pair}", warmup, steps)
                runs["nanogpt"].append(run_nanogpt(nanogpt, settings, out / f"nanogpt-{pair}.log", warmup))
        line = ", ".join(f"{side} {runs[side][-1]['tokens_per_s']:.0f} tok/s" for side in order if runs[side])
        if runs["nanogpt"]:
            ours, theirs = runs["txtrain"][-1], runs["nanogpt"][-1]
            line += (f"; txtrain / nanogpt {ours['tokens_per_s'] / theirs['tokens_per_s']:.3f}, max RSS "
                     f"{ours['max_rss_bytes'] / 2**20:.0f} / {theirs['max_rss_bytes'] / 2**20:.0f} MiB")
        print(f"pair {pair + 1}/{pairs}: {line}", flush=True)
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
    if runs["nanogpt"]:
        result["nanogpt"] = summarize(runs["nanogpt"], flops, peak, device, dtype)
        result["vs_nanogpt"] = versus(runs["txtrain"], runs["nanogpt"], "nanogpt")
        result["vs_nanogpt"]["command"] = runs["nanogpt"][0]["command"]
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


def nanogpt_mismatch(cfg: Config, device: str) -> str | None:
    """Why nanoGPT's train.py cannot train the model and batch txtrain trains (None: it can)."""
    m, t = cfg.model, cfg.train
    checks = {
        "task is not a text task": cfg.task.name != "text",
        "parallel is not none": str(cfg.parallel.name) != "none",
        "the model is not GPT-2-like (learned positions, pre-norm, GELU, tied embeddings, d_ff = 4 x width)":
            (str(m.arch), str(m.pos), str(m.norm), str(m.activation), m.tie_embeddings, m.d_ff)
            != ("gpt", "learned", "pre", "gelu", True, None),
        "model.impl is not sdpa (nanoGPT's attention)": str(m.impl) != "sdpa",
        "activation checkpointing is on": m.activation_checkpointing,
        "the batch is not a whole number of micro-batches": t.batch_size % (t.micro_batch_size or t.batch_size) != 0,
        "the optimizer is not adamw": str(cfg.optim.name) != "adamw",
        "label smoothing is on": t.label_smoothing > 0,
        f"model.max_seq_len is not task.seq_len (nanoGPT's position table has {cfg.task.seq_len} rows)":
            cfg.task.name == "text" and m.max_seq_len != cfg.task.seq_len,
        "precision is not fp32 (nanoGPT computes in fp32 on a CPU)": device == "cpu" and str(cfg.precision.name) != "fp32",
        "precision.tf32 is off (nanoGPT always allows TF32)": device.startswith("cuda") and not cfg.precision.tf32,
    }
    reasons = [reason for reason, applies in checks.items() if applies]
    return "; ".join(reasons) or None


def nanogpt_data(task, folder: Path) -> Path:
    """txtrain's training and validation tokens as nanoGPT's data folder (uint16 ids)."""
    if task.vocab_size > 2**16:
        sys.exit(f"error: nanoGPT stores tokens as uint16: a vocabulary of {task.vocab_size:,} does not fit")
    folder.mkdir(parents=True, exist_ok=True)
    chunk = 1 << 24
    for name, tokens in (("train.bin", task.train_tokens), ("val.bin", task.val_tokens)):
        with (folder / name).open("wb") as file:
            for first in range(0, len(tokens), chunk):
                tokens.read(first, min(chunk, len(tokens) - first)).astype(np.uint16).tofile(file)
    # Without meta.pkl nanoGPT takes GPT-2's vocabulary, padded to 50304, as txtrain pads it
    if task.codec.name not in GPT2_NAMES:
        with (folder / "meta.pkl").open("wb") as file:
            pickle.dump({"vocab_size": task.vocab_size}, file)
    return folder.resolve()


def nanogpt_settings(cfg: Config, device: str, data_dir: Path, run_dir: Path, warmup: int, steps: int) -> dict:
    """nanoGPT's train.py options for txtrain's config. It reads ``data/<dataset>`` and writes
    ``out_dir`` under its working directory, its checkout (where its configurator.py is);
    absolute paths put both here. It evaluates at iteration 0 only, and on one batch."""
    m, o, t = cfg.model, cfg.optim, cfg.train
    micro = t.micro_batch_size or t.batch_size
    iterations = max(warmup, 1) + steps  # iteration 0, with the evaluation, is never timed
    return {"dataset": str(data_dir), "out_dir": str(run_dir.resolve()), "init_from": "scratch",
            "batch_size": micro, "gradient_accumulation_steps": t.batch_size // micro,
            "block_size": cfg.task.seq_len, "n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd,
            "dropout": float(m.dropout), "bias": m.bias, "learning_rate": float(o.lr), "decay_lr": False,
            "weight_decay": float(o.weight_decay), "beta1": float(o.beta1), "beta2": float(o.beta2),
            "grad_clip": float(t.grad_clip), "device": device, "dtype": NANOGPT_DTYPES[str(cfg.precision.name)],
            "compile": cfg.compile, "max_iters": iterations - 1, "eval_interval": iterations, "eval_iters": 1,
            "log_interval": 1, "always_save_checkpoint": False, "wandb_log": False}


def nanogpt_command(nanogpt: Path, settings: dict) -> list[str]:
    # configurator.py takes --key=value and keeps a value's Python type: a float stays a float
    # (repr: "1.0", never "1"), a bool is True or False, and a string has no "=".
    options = []
    for key, value in settings.items():
        text = repr(value) if isinstance(value, float) else str(value)
        if "=" in text:
            sys.exit(f"error: nanoGPT's --{key} cannot hold an '=' ({text})")
        options.append(f"--{key}={text}")
    return [sys.executable, str(nanogpt.resolve() / "train.py"), *options]


def run_nanogpt(nanogpt: Path, settings: dict, log_file: Path, warmup: int) -> dict:
    command = nanogpt_command(nanogpt, settings)
    # no __pycache__ in the checkout
    max_rss = run(command, log_file, cwd=nanogpt, env={"PYTHONDONTWRITEBYTECODE": "1"})
    iterations = [(int(i), float(loss), float(ms) / 1000)
                  for i, loss, ms in NANOGPT_ITERATION.findall(log_file.read_text())]
    seconds = [s for i, _, s in iterations if i >= max(warmup, 1)]
    if not seconds:
        sys.exit(f"error: nanoGPT printed no timed iteration (iter N: loss X, time Y ms); see {log_file}")
    tokens_per_step = settings["batch_size"] * settings["gradient_accumulation_steps"] * settings["block_size"]
    return {"step_seconds": seconds, "tokens_per_s": tokens_per_step / statistics.median(seconds),
            # its CUDA allocator's peak is not known: the OS's max RSS is its only figure
            "peak_memory_bytes": None if settings["device"].startswith("cuda") else max_rss,
            "max_rss_bytes": max_rss, "losses": [loss for _, loss, _ in iterations], "command": command}


def versus(ours: list[dict], theirs: list[dict], name: str) -> dict:
    """txtrain / loop ``name``, per pair and the median: tokens/s and the OS's max RSS."""
    speed = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(ours, theirs)]
    memory = [a["max_rss_bytes"] / b["max_rss_bytes"] for a, b in zip(ours, theirs)]
    return {"ratio": statistics.median(speed), "ratio_per_pair": speed,
            "max_rss_ratio": statistics.median(memory), "max_rss_ratio_per_pair": memory,
            "tokens_per_s_per_pair": {"txtrain": [a["tokens_per_s"] for a in ours],
                                      name: [b["tokens_per_s"] for b in theirs]},
            "max_rss_bytes_per_pair": {"txtrain": [a["max_rss_bytes"] for a in ours],
                                       name: [b["max_rss_bytes"] for b in theirs]}}


def run_txtrain(overrides: list[str], run_dir: Path, warmup: int) -> dict:
    # plot=false: the peak memory is the training's, not matplotlib's (nanoGPT draws nothing)
    command = [sys.executable, "-m", "txtrain", "plot=false", *overrides, f"hydra.run.dir={run_dir}",
               "resume=never"]
    max_rss = run(command, run_dir.with_suffix(".log"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if r["step"] > warmup]
    memory = json.loads((run_dir / "memory.json").read_text())[0]
    on_cuda = memory["measured_by"].startswith("torch.cuda")
    return {"step_seconds": [r["step_ms"] / 1000 for r in timed],
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "data_wait": statistics.mean(r["data_wait"] for r in timed),
            "startup_s": json.loads((run_dir / "run.json").read_text()).get("startup_s"),
            "peak_memory_bytes": memory["measured_peak"] if on_cuda else max_rss, "max_rss_bytes": max_rss,
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
            "max_rss_bytes": max_rss, "losses": result["losses"]}


def run(command: list[str], log_file: Path, cwd: Path | None = None, env: dict | None = None) -> int:
    """Run ``command`` to the end (its output into ``log_file``); its peak resident size in bytes."""
    rss_file = log_file.with_suffix(".max_rss")
    with log_file.open("w") as log:
        status = subprocess.run([sys.executable, "-c", GO_BETWEEN, str(rss_file), *command], stdout=log,
                                stderr=subprocess.STDOUT, cwd=cwd,
                                env=dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))).returncode
    if status != 0:
        sys.exit(f"error: {Path(command[1]).name} {' '.join(command[2:5])} ... failed; see {log_file}")
    return int(rss_file.read_text())


def summarize(runs: list[dict], flops: float, peak: float, device: str, dtype: str) -> dict:
    seconds = [s for run in runs for s in run["step_seconds"]]
    tokens_per_s = statistics.median(run["tokens_per_s"] for run in runs)
    achieved = flops * tokens_per_s
    summary = {"tokens_per_s": tokens_per_s, "tokens_per_s_per_run": [run["tokens_per_s"] for run in runs],
               "step_ms_median": 1000 * statistics.median(seconds),
               "step_ms_p10_p90": [1000 * float(np.percentile(seconds, q)) for q in (10, 90)],
               "achieved_flops": achieved, "mfu": achieved / peak,
               "max_rss_bytes": max(run["max_rss_bytes"] for run in runs)}
    vendor = vendor_peak(device, dtype)
    if vendor:
        summary["mfu_vendor_peak"] = achieved / vendor
    if all(run["peak_memory_bytes"] is not None for run in runs):
        summary["peak_memory_bytes"] = max(run["peak_memory_bytes"] for run in runs)
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
    if "nanogpt" in result:
        theirs, vs = result["nanogpt"], result["vs_nanogpt"]
        line += (f"; nanoGPT {theirs['tokens_per_s']:,.0f} tok/s: txtrain / nanoGPT {vs['ratio']:.3f} (pairs "
                 f"{', '.join(f'{r:.3f}' for r in vs['ratio_per_pair'])}), max RSS {ours['max_rss_bytes'] / 2**30:.2f}"
                 f" / {theirs['max_rss_bytes'] / 2**30:.2f} GiB: {vs['max_rss_ratio']:.3f} (pairs "
                 f"{', '.join(f'{r:.3f}' for r in vs['max_rss_ratio_per_pair'])})")
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
