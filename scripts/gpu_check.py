"""Do txtrain's GPU paths work on this machine, and how fast are they? One command, one table.

    python scripts/gpu_check.py                      # on the GPUs, about 5 minutes on one H100
    python scripts/gpu_check.py --device cpu         # the same matrix scaled down, on a CPU
    python scripts/gpu_check.py --only ddp-vs-none speed-gpt2 --out result.json

Options: ``--out`` (the JSON report, default ``gpu_check.json``); ``--work`` (where the runs
go, default ``outputs/gpu_check/``, emptied of earlier runs first); ``--data`` (the Socratic
dialogues) and ``--tokenizer-file`` (GPT-2's ranks), by default ``shared/data/socrates`` and
``shared/tiktoken/gpt2.tiktoken`` beside the project root, or inside it; ``--budget`` (seconds
for the whole matrix, default 420 on a GPU and 900 on a CPU: a check that would start too late
to end within it is skipped); ``--jobs`` (checks at a time: 1 on a GPU, 2 on a CPU, whose runs
are mostly start-up on one core). It needs txtrain's dependencies (torch, hydra-core, omegaconf,
tiktoken, numpy) importable, and says which are missing if not.

Each check runs in a process of its own, under a time limit of its own, and each txtrain run
in it is a fresh process (the real command line, ``torchrun`` for ddp and fsdp): a crash or a
hang fails that row and the next check goes on. The report holds every row (status pass /
fail / skip, the figure, details and the numbers behind them) and the machine it ran on, and
is written again as each row comes in (a command cut short still leaves its finished rows); a
Markdown table of the rows is printed at the end, with each row's details below it. Every
run's log and run dir stay in ``--work``. Exit status 1 if any check failed.

The rows (on ``--device cpu``, the scaled-down version or why it is skipped is in brackets):

- ``reverse-fp32``, ``reverse-bf16``, ``reverse-fp16``: ``task=reverse`` with its recipe on
  ``model=tiny`` (700 steps) reaches at least 99% exact match on the held-out strings; the
  figure is the last evaluation. [fp32 only, on strings of up to 4 symbols, 70 steps; bf16
  and fp16 are emulated on a CPU, so their targets are for GPUs.]
- ``ddp-vs-none``, ``fsdp-vs-none``: ``parallel=ddp`` / ``fsdp`` in one process under
  torchrun (NCCL on a GPU, gloo on a CPU) give the per-step losses of ``parallel=none``: 12
  logged steps in fp32 (TF32 off), no dropout, relative difference at most 1e-5.
- ``dp-bf16``: ``parallel=dp precision=bf16`` over every GPU computes in bf16: a forward hook
  on each Linear records the dtype of its output in every DataParallel replica during one
  ``Trainer.train_step``, and an evaluation follows. [Needs 2 GPUs: DataParallel does not
  wrap with fewer.]
- ``compile``: ``compile=true`` trains, with losses within 1e-3 of eager; the figure says how
  long the first step (the compilation) took. [Skipped: inductor's C++ build on a CPU takes
  minutes.]
- ``activation-checkpointing``: ``model.activation_checkpointing=true`` gives the losses of
  the run without it (relative difference at most 1e-5; recomputation is exact).
- ``checkpoint-gpu-to-cpu``: the run of ``ddp-vs-none``'s reference, saved at step 6 on the
  GPU, resumes with ``device=cpu`` and no GPU visible in another run dir; its losses at steps
  7..12 are the GPU run's within 1e-4. [cpu -> cpu.]
- ``checkpoint-cpu-to-gpu``: the same run made on the CPU resumes on the GPU. [Skipped.]
- ``cuda-rng-fewer-devices``: a run with dropout saved with every GPU visible resumes with
  ``CUDA_VISIBLE_DEVICES=0`` on the same dropout masks (losses within 1e-5; dropout must
  visibly change the losses, or the check could not tell). With one GPU it is still a smoke
  test of restoring the CUDA generator. [Skipped.]
- ``memory-plan``: a run of ``model=base`` (batch 128): txtrain's planned peak against its
  measured ``torch.cuda.max_memory_allocated`` (``memory.json``), for every rank; passes when
  measured / planned is within [0.67, 1.5]. [The reference run's memory.json must hold both
  figures for every rank; a CPU's measure, the process's resident size, is not held to the band.]
- ``speed-gpt2``: ``model=gpt2`` (124M) on the Socratic dialogues (GPT-2's tokenizer,
  1024-token windows, batch 16), bf16 and ``compile=true``, 20 timed steps after 5: tokens/s,
  MFU against the data sheet's dense peak (and against a matmul measured now), peak memory
  against the plan. FLOPs per token, MFU and the peaks come from ``scripts/bench.py``.
  Should compile=true fail, the same run is timed eagerly (and the row fails, saying so).
  Skipped, with the reason, when the corpus or the tokenizer file is missing. [``model=tiny``
  on a small generated text, bytes tokenizer, fp32, eager, 5 timed steps after 2.]
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import importlib.util
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
MEMORY_BAND = (0.67, 1.5)  # measured / planned peak that counts as a good plan
GRACE_S = 35  # after SIGTERM: torchrun's agent gives its workers 30 s to stop before killing them


# --- results ---------------------------------------------------------------------------------
@dataclass
class Result:
    passed: bool
    figure: str
    detail: str = ""
    data: dict = field(default_factory=dict)


class Skip(Exception):
    """The check does not apply here; the message says why."""


class Failed(Exception):
    """The check could not get its figure (a run failed, a file is missing); the message says why."""


# --- the context a check runs in ---------------------------------------------------------------
@dataclass
class Context:
    check: str  # the check's name
    device: str  # cuda | cpu
    gpus: int
    work: Path
    deadline: float  # time.time() by which this check must be done
    data: Path | None
    tokenizer_file: Path | None

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    def time_left(self) -> float:
        return self.deadline - time.time()

    def run(self, name: str, overrides: list[str], nproc: int = 0, env: dict | None = None) -> "Run":
        """txtrain with ``overrides`` in the run dir ``<work>/runs/<name>`` (under torchrun with
        ``nproc`` processes if given). A run already made by an earlier check (the references
        several checks compare against) is not made again. Raises Failed if it did not finish."""
        run = Run(self.work / "runs" / name)
        with locked(run.dir.with_suffix(".lock")):  # a check in another lane may be making it
            if not run.record.exists():
                run.make(self.txtrain_command(run.dir, overrides, nproc), env, self.time_left(),
                         self.work, running_dir(self.work, self.check))
        return run.finished()

    def txtrain_command(self, run_dir: Path, overrides: list[str], nproc: int) -> list[str]:
        # plot=false: no check looks at loss.png, and drawing it is a second of every run
        overrides = merge([f"device={self.device}", "progress=false", "plot=false", "resume=never"], overrides,
                          [f"hydra.run.dir={run_dir}"])
        if nproc:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={nproc}", "-m", "txtrain", *overrides]
        return [sys.executable, "-m", "txtrain", *overrides]


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the holder is done, or dies
        yield


def running_dir(work: Path, check: str) -> Path:
    """Where a check notes the process groups of its runs while they run, so that the main
    process can stop them should the check itself be killed."""
    return work / "running" / check


def merge(*groups: list[str]) -> list[str]:
    """Overrides, a later value for the same key replacing an earlier one (Hydra refuses a key
    given twice)."""
    merged: dict[str, str] = {}
    for group in groups:
        for override in group:
            merged[override.split("=", 1)[0]] = override
    return list(merged.values())


class Run:
    """One txtrain process (or torchrun job) and what it left in its run dir."""

    def __init__(self, run_dir: Path):
        self.dir = run_dir
        self.record = run_dir.with_suffix(".json")  # how it ended: status, seconds, error
        self.log = run_dir.with_suffix(".log")  # its stdout and stderr

    def make(self, command: list[str], env: dict | None, timeout: float, work: Path, running: Path) -> None:
        self.dir.parent.mkdir(parents=True, exist_ok=True)
        started, cpu_before = time.time(), children_cpu_seconds()
        shutil.rmtree(self.dir, ignore_errors=True)  # what a killed check left of it
        with self.log.open("w") as log:
            log.write(" ".join(command) + "\n\n")
            log.flush()
            process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       env=child_env(work, env), start_new_session=True)
            marker = running / str(process.pid)
            running.mkdir(parents=True, exist_ok=True)
            marker.touch()
            try:
                status = process.wait(timeout=max(1.0, timeout))
                error = "" if status == 0 else last_error(self.log)
            except subprocess.TimeoutExpired:
                stop_group(process)
                status, error = -1, f"timed out after {time.time() - started:.0f}s"
            marker.unlink()
        self.record.write_text(json.dumps({"status": status, "seconds": time.time() - started,
                                           "cpu_seconds": children_cpu_seconds() - cpu_before,
                                           "error": error}) + "\n")

    def finished(self) -> "Run":
        record = json.loads(self.record.read_text())
        if record["status"] != 0:
            raise Failed(f"run {self.dir.name}: {record['error']} (log: {self.log})")
        self.seconds = record["seconds"]
        return self

    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_jsonl(self.dir / "metrics.jsonl")}

    def records(self) -> list[dict]:
        return read_jsonl(self.dir / "metrics.jsonl")

    def evaluations(self) -> list[dict]:
        return read_jsonl(self.dir / "eval.jsonl")

    def memory(self) -> list[dict]:
        return json.loads((self.dir / "memory.json").read_text())

    def checkpoint(self, step: int) -> Path:
        path = self.dir / "checkpoints" / f"step_{step:06d}"
        if not path.is_dir():
            raise Failed(f"run {self.dir.name} saved no checkpoint at step {step}")
        return path


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the processes waited for so far
    return usage.ru_utime + usage.ru_stime


def child_env(work: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONWARNINGS="ignore", TXTRAIN_CACHE=str(work / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.pop("HYDRA_FULL_ERROR", None)
    env.update(extra or {})
    return env


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (txtrain saves and stops, torchrun stops its workers), then
    SIGKILL to whatever is left of it."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def last_error(log: Path) -> str:
    """The line of a failed run's output that says why: txtrain's ``error:`` line, else the
    last line of a traceback, else the last line."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:") or re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line):
            return line[:400]
    return lines[-1][:400] if lines else "no output"


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise Failed(f"{path.parent.name} wrote no {path.name}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- comparing runs ----------------------------------------------------------------------------
def worst_difference(got: dict[int, float], expected: dict[int, float], steps) -> float:
    """The largest relative difference between two runs' losses over ``steps``."""
    steps = list(steps)
    missing = [s for s in steps if got.get(s) is None or expected.get(s) is None]
    if missing:
        raise Failed(f"no finite loss logged at step(s) {missing[:5]}")
    return max(abs(got[s] - expected[s]) / max(abs(expected[s]), 1e-12) for s in steps)


def same_losses(run: Run, reference: Run, tolerance: float, steps) -> Result:
    worst = worst_difference(run.losses(), reference.losses(), steps)
    steps = list(steps)
    return Result(worst <= tolerance, f"max rel. loss diff {worst:.1e} (<= {tolerance:g})",
                  f"steps {steps[0]}..{steps[-1]}, against run {reference.dir.name}",
                  {"max_relative_difference": worst, "tolerance": tolerance,
                   "losses": run.losses(), "reference_losses": reference.losses()})


# --- the runs the checks share -------------------------------------------------------------------
REF_STEPS = 12
SAVED_AT = 6  # the reference saves here; the resume checks continue from it to REF_STEPS


def reference_overrides(ctx: Context) -> list[str]:
    """The short fp32 run that strategies, checkpointing and resuming are compared against:
    every step logged, no dropout, TF32 off (true fp32), a short warmup so that weights move."""
    return [f"train.steps={REF_STEPS}", "train.log_every=1", f"train.save_every={SAVED_AT}",
            "train.eval_every=0", "task.n_eval=100", "model.dropout=0", "precision=fp32",
            "precision.tf32=false", "optim.lr=3e-3", "schedule.warmup_steps=2",
            f"train.batch_size={64 if ctx.on_gpu else 16}"]


def reference(ctx: Context) -> Run:
    return ctx.run("reference", reference_overrides(ctx))


NO_GPU = {"CUDA_VISIBLE_DEVICES": ""}


def cpu_reference(ctx: Context) -> Run:
    """The reference run made on the CPU, as a machine without a GPU would make it."""
    return ctx.run("reference-cpu", merge(reference_overrides(ctx), ["device=cpu"]), env=NO_GPU)


# --- the checks ------------------------------------------------------------------------------------
REVERSE_ON_CPU = ["task.max_len=4", "train.batch_size=32", "optim.lr=1e-2", "train.steps=70",
                  "schedule.warmup_steps=10", "task.n_eval=200", "train.eval_every=0"]


def reverse(precision: str) -> Callable[[Context], Result]:
    def check(ctx: Context) -> Result:
        if not ctx.on_gpu and precision != "fp32":
            raise Skip(f"{precision} is emulated on a CPU (slow); its accuracy target is for GPUs")
        scaled = [] if ctx.on_gpu else REVERSE_ON_CPU
        run = ctx.run(f"reverse-{precision}", [f"precision={precision}", "train.save_every=0", *scaled])
        last = run.evaluations()[-1]
        what = "the recipe" if ctx.on_gpu else "lengths 1..4, 70 steps of 32"
        return Result(last["exact_match"] >= 0.99, f"exact match {last['exact_match']:.3f} (>= 0.99)",
                      f"{what}; step {last['step']}, eval_loss {last['eval_loss']:.4f}, {run.seconds:.0f}s",
                      {"evaluations": run.evaluations()})
    check.__doc__ = f"reverse, model=tiny, {precision}: exact match >= 0.99"
    return check


def strategy_parity(strategy: str) -> Callable[[Context], Result]:
    def check(ctx: Context) -> Result:
        expected = reference(ctx)
        run = ctx.run(strategy, merge(reference_overrides(ctx), [f"parallel={strategy}"]), nproc=1)
        result = same_losses(run, expected, 1e-5, range(1, REF_STEPS + 1))
        result.detail += f"; torchrun, 1 process, {'nccl' if ctx.on_gpu else 'gloo'}"
        return result
    check.__doc__ = f"parallel={strategy} (torchrun, 1 process) vs none: fp32 per-step losses"
    return check


def check_dp_bf16(ctx: Context) -> Result:
    """parallel=dp precision=bf16: every replica's Linear layers output bf16"""
    if not ctx.on_gpu:
        raise Skip("DataParallel needs CUDA GPUs")
    if ctx.gpus < 2:
        raise Skip(f"{ctx.gpus} GPU visible: parallel=dp runs as none with fewer than 2")
    import torch
    from torch import nn

    from txtrain.optim import lr_factor
    from txtrain.train import Trainer

    cfg = compose(["parallel=dp", "precision=bf16", "train.batch_size=64", "task.n_eval=100"])
    trainer = Trainer(cfg, ctx.work / "runs" / "dp-bf16")
    if not isinstance(trainer.model, nn.DataParallel):
        raise Failed(f"parallel=dp did not wrap the model in DataParallel ({type(trainer.model).__name__})")
    seen: set[tuple[str, str]] = set()

    def record(module, inputs, output):  # runs in each replica's thread; replicas share hooks
        seen.add((str(output.device), str(output.dtype).replace("torch.", "")))

    for module in trainer.strategy.unwrap(trainer.model).modules():
        if isinstance(module, nn.Linear):
            module.register_forward_hook(record)
    loss, _ = trainer.train_step(trainer.task.train_batch(0, cfg.train.batch_size),
                                 cfg.optim.lr * lr_factor(cfg.schedule, 0, cfg.train.steps))
    devices = sorted({device for device, _ in seen})
    dtypes = sorted({dtype for _, dtype in seen})
    # Evaluation runs on the first GPU alone: DataParallel would gather one loss per GPU.
    with torch.no_grad(), trainer.precision.autocast():
        evaluation = trainer.strategy.evaluate(trainer.model, trainer.task.evaluation(cfg.train.eval_batch_size))
    passed = dtypes == ["bfloat16"] and len(devices) >= 2 and bool(torch.isfinite(loss))
    return Result(passed, f"Linear outputs {', '.join(dtypes)} on {len(devices)} GPUs",
                  f"devices {', '.join(devices)}; loss {loss.item():.4f}; evaluation {evaluation}",
                  {"seen": sorted(seen), "loss": loss.item(), "evaluation": evaluation})


def check_compile(ctx: Context) -> Result:
    """compile=true trains, losses close to eager (fp32)"""
    if not ctx.on_gpu:
        raise Skip("inductor builds C++ kernels for minutes on a small CPU; compile is checked on GPUs")
    expected = reference(ctx)
    run = ctx.run("compile", merge(reference_overrides(ctx), ["compile=true"]))
    result = same_losses(run, expected, 1e-3, range(1, REF_STEPS + 1))
    first_step = re.search(r"compile: the first step took ([\d.]+)s", (run.dir / "txtrain.log").read_text())
    if first_step:
        result.figure += f"; first step {first_step.group(1)}s"
        result.data["first_step_s"] = float(first_step.group(1))
    return result


def check_activation_checkpointing(ctx: Context) -> Result:
    """model.activation_checkpointing=true: the same losses as without"""
    expected = reference(ctx)
    run = ctx.run("activation-checkpointing",
                  merge(reference_overrides(ctx), ["model.activation_checkpointing=true"]))
    return same_losses(run, expected, 1e-5, range(1, REF_STEPS + 1))


def resumed_elsewhere(ctx: Context, name: str, saved: Run, overrides: list[str], env: dict | None) -> Result:
    """Resume ``saved`` from its step-6 checkpoint in a new run dir; its next losses must be
    ``saved``'s."""
    run = ctx.run(name, merge(reference_overrides(ctx), overrides, [f"resume={saved.checkpoint(SAVED_AT)}"]),
                  env=env)
    return same_losses(run, saved, 1e-4, range(SAVED_AT + 1, REF_STEPS + 1))


def check_gpu_to_cpu(ctx: Context) -> Result:
    """checkpoint saved on the GPU resumes with device=cpu (no GPU visible): same next losses"""
    result = resumed_elsewhere(ctx, "gpu-to-cpu", reference(ctx), ["device=cpu"], NO_GPU)
    if not ctx.on_gpu:
        result.detail += "; no GPU: saved on the CPU too"
    return result


def check_cpu_to_gpu(ctx: Context) -> Result:
    """checkpoint saved on the CPU (no GPU visible) resumes on the GPU: same next losses"""
    if not ctx.on_gpu:
        raise Skip("no GPU; checkpoint-gpu-to-cpu ran cpu -> cpu")
    return resumed_elsewhere(ctx, "cpu-to-gpu", cpu_reference(ctx), ["device=cuda"], None)


def check_cuda_rng(ctx: Context) -> Result:
    """dropout run saved with every GPU visible resumes under CUDA_VISIBLE_DEVICES=0, same masks"""
    if not ctx.on_gpu:
        raise Skip("no GPU: no CUDA generator to restore")
    with_dropout = merge(reference_overrides(ctx), ["model.dropout=0.1"])
    saved = ctx.run("rng-save", with_dropout)
    run = ctx.run("rng-resume", merge(with_dropout, [f"resume={saved.checkpoint(SAVED_AT)}"]),
                  env={"CUDA_VISIBLE_DEVICES": "0"})
    steps = range(SAVED_AT + 1, REF_STEPS + 1)
    result = same_losses(run, saved, 1e-5, steps)
    result.detail += f"; saved with {ctx.gpus} GPU(s) visible"
    try:  # against the same run without dropout
        dropout_effect = worst_difference(saved.losses(), reference(ctx).losses(), steps)
    except Failed as failure:
        result.detail += f"; dropout's effect not measured: {failure}"
        return result
    result.data["dropout_effect"] = dropout_effect
    result.detail += f"; dropout moves the losses by {dropout_effect:.1e}"
    if dropout_effect < 1e-3:  # then the same losses would not show the same masks
        result.passed = False
        result.detail += " (too little to tell masks apart)"
    return result


def memory_ratios(run: Run) -> list[dict]:
    return [{"rank": r["rank"], "planned": r["planned"]["peak"], "measured": r["measured_peak"],
             "ratio": r["measured_peak"] / r["planned"]["peak"], "measured_by": r["measured_by"]}
            for r in run.memory()]


def describe_memory(ratios: list[dict], measured: str = "measured") -> str:
    """The rank whose measured peak is furthest from its plan."""
    worst = max(ratios, key=lambda r: abs(r["ratio"] - 1))
    return (f"{measured}/planned {worst['ratio']:.2f} ({worst['measured'] / 2**30:.2f} / "
            f"{worst['planned'] / 2**30:.2f} GiB, rank {worst['rank']})")


def check_memory_plan(ctx: Context) -> Result:
    """planned peak memory against the measured peak (memory.json)"""
    lo, hi = MEMORY_BAND
    if not ctx.on_gpu:
        ratios = memory_ratios(reference(ctx))
        complete = all(r["planned"] > 0 and r["measured"] > 0 for r in ratios)
        return Result(complete, describe_memory(ratios, "resident size"),
                      f"CPU: measured is the process's resident size ({ratios[0]['measured_by']}), "
                      f"not held to [{lo}, {hi}]", {"ranks": ratios})
    run = ctx.run("memory", ["model=base", "train.batch_size=128", "train.steps=10", "train.eval_every=0",
                             "train.save_every=0", "task.n_eval=100"])
    ratios = memory_ratios(run)
    passed = all(lo <= r["ratio"] <= hi for r in ratios)
    return Result(passed, describe_memory(ratios), f"model=base, reverse, batch 128, fp32; band "
                  f"[{lo}, {hi}] of torch.cuda.max_memory_allocated", {"ranks": ratios})


SPEED_STEPS = {"cuda": (5, 20), "cpu": (2, 5)}  # untimed (compiling), then timed
SPEED_ON_GPU = ["model=gpt2", "task=socrates", "task.seq_len=1024", "train.batch_size=16",
                "model.dropout=0", "precision=bf16", "compile=true", "task.eval_tokens=16384",
                "task.sample_tokens=0"]
SPEED_ON_CPU = ["model=tiny", "task=text", "task.tokenizer=bytes", "task.seq_len=64", "train.batch_size=8",
                "model.dropout=0", "precision=fp32", "task.eval_tokens=512", "task.sample_tokens=0"]
WORDS = "the quick brown fox jumps over the lazy dog while socrates asks what justice is. "


def speed_overrides(ctx: Context) -> list[str]:
    warmup, steps = SPEED_STEPS[ctx.device]
    window = [f"train.steps={warmup + steps}", "train.log_every=1", "train.eval_every=0",
              "train.save_every=0"]
    if not ctx.on_gpu:
        corpus = ctx.work / "corpus.txt"
        corpus.write_text(WORDS * 400)
        return [*SPEED_ON_CPU, f"task.data.path={corpus}", *window]
    for what, path in (("corpus (--data)", ctx.data), ("GPT-2 tokenizer file (--tokenizer-file)",
                                                       ctx.tokenizer_file)):
        if path is None or not path.exists():
            raise Skip(f"no {what}: {path or 'not given'}")
    return [*SPEED_ON_GPU, f"task.data.path={ctx.data}", f"task.tokenizer_file={ctx.tokenizer_file}",
            *window]


def timed_window(run: Run, warmup: int, steps: int) -> tuple[int, float]:
    """Tokens and seconds of the steps after the warmup (evaluation and saving left out)."""
    records = {r["step"]: r for r in run.records()}
    tokens = records[warmup + steps]["tokens"] - records[warmup]["tokens"]
    return tokens, sum(records[step]["step_ms"] for step in range(warmup + 1, warmup + steps + 1)) / 1000


def check_speed(ctx: Context) -> Result:
    """model=gpt2 on the Socratic dialogues, bf16, compile=true: tokens/s, MFU, memory"""
    overrides, trouble = speed_overrides(ctx), ""
    try:
        run = ctx.run("speed", overrides)
    except Failed as failure:  # still time the model, eagerly, rather than report nothing
        if "compile=true" not in overrides:
            raise
        trouble = f"compile=true failed ({failure}); timed eager instead; "
        overrides = merge(overrides, ["compile=false"])
        run = ctx.run("speed-eager", overrides)
    warmup, steps = SPEED_STEPS[ctx.device]
    tokens, seconds = timed_window(run, warmup, steps)
    tokens_per_s = tokens / seconds

    bench = load_script("bench")  # FLOPs per token, matmul peaks: the benchmark's own
    cfg = compose(overrides)
    from txtrain.tasks import build_task

    vocab_size = build_task(cfg.task, cfg.seed, progress=False).vocab_size  # from the token cache
    dtype = str(cfg.precision.name)
    flops = bench.flops_per_token(cfg, vocab_size)
    achieved = flops * tokens_per_s
    measured_peak = bench.matmul_peak(ctx.device, dtype)
    vendor_peak = bench.vendor_peak(ctx.device, dtype)
    ratios = memory_ratios(run)
    figure = f"{tokens_per_s:,.0f} tok/s, MFU " + (
        f"{achieved / vendor_peak:.2f} of {vendor_peak / 1e12:.0f} TFLOP/s (data sheet)" if vendor_peak
        else f"{achieved / measured_peak:.2f} of a measured {dtype} matmul")
    detail = (f"{'' if ctx.on_gpu else 'model=tiny, bytes, fp32, eager; '}{trouble}{steps} steps of "
              f"{tokens // steps:,} tokens after {warmup}, {1000 * seconds / steps:.1f} ms/step; "
              f"{flops / 1e6:.0f} MFLOP/token, {flop_rate(achieved)}, {achieved / measured_peak:.2f} of a "
              f"{dtype} matmul measured at {flop_rate(measured_peak)}; peak memory {describe_memory(ratios)}")
    return Result(tokens_per_s > 0 and not trouble, figure, detail,
                  {"tokens_per_s": tokens_per_s, "step_ms": 1000 * seconds / steps,
                   "flops_per_token": flops, "achieved_flops": achieved, "matmul_peak_flops": measured_peak,
                   "vendor_peak_flops": vendor_peak,
                   "mfu_vendor_peak": achieved / vendor_peak if vendor_peak else None,
                   "mfu_measured_peak": achieved / measured_peak, "memory": ratios,
                   "device_name": bench.device_name(ctx.device), "overrides": overrides})


def flop_rate(flops_per_s: float) -> str:
    return f"{flops_per_s / 1e12:.1f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.1f} GFLOP/s"


@dataclass
class Check:
    name: str
    function: Callable[[Context], Result]
    budget_s: dict  # seconds, on "cuda" and on "cpu"

    @property
    def what(self) -> str:
        return (self.function.__doc__ or self.name).strip().splitlines()[0]


# Run in this order. Budgets are about 2-3x the expected time (on one H100; on 2 CPU cores);
# the references a check shares with later ones are paid by the first that needs them.
CHECKS = [
    Check("reverse-fp32", reverse("fp32"), {"cuda": 100, "cpu": 150}),
    Check("reverse-bf16", reverse("bf16"), {"cuda": 100, "cpu": 30}),
    Check("reverse-fp16", reverse("fp16"), {"cuda": 100, "cpu": 30}),
    Check("ddp-vs-none", strategy_parity("ddp"), {"cuda": 120, "cpu": 150}),
    Check("fsdp-vs-none", strategy_parity("fsdp"), {"cuda": 90, "cpu": 120}),
    Check("dp-bf16", check_dp_bf16, {"cuda": 90, "cpu": 30}),
    Check("activation-checkpointing", check_activation_checkpointing, {"cuda": 60, "cpu": 90}),
    Check("checkpoint-gpu-to-cpu", check_gpu_to_cpu, {"cuda": 60, "cpu": 90}),
    Check("checkpoint-cpu-to-gpu", check_cpu_to_gpu, {"cuda": 90, "cpu": 30}),
    Check("cuda-rng-fewer-devices", check_cuda_rng, {"cuda": 90, "cpu": 30}),
    Check("memory-plan", check_memory_plan, {"cuda": 60, "cpu": 90}),
    Check("speed-gpt2", check_speed, {"cuda": 240, "cpu": 120}),
    Check("compile", check_compile, {"cuda": 180, "cpu": 30}),
]
DEFAULT_BUDGET_S = {"cuda": 420, "cpu": 900}  # the whole matrix: within 8 minutes on a GPU
# Checks at a time. A CPU's runs are mostly start-up, one core each: two lanes halve the time. On
# a GPU one at a time: speed is timed alone, and nothing else can disturb the one try.
DEFAULT_JOBS = {"cuda": 1, "cpu": 2}


# --- running the checks ---------------------------------------------------------------------------
def compose(overrides: list[str]):
    from txtrain.cli import compose_config

    return compose_config("progress=false", *overrides)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def run_one_check(check: Check, ctx: Context) -> dict:
    """In the check's own process: its row."""
    try:
        result = check.function(ctx)
        row = {"status": "pass" if result.passed else "fail", "figure": result.figure,
               "detail": result.detail, "data": result.data}
    except Skip as reason:
        row = {"status": "skip", "figure": "", "detail": str(reason), "data": {}}
    except Failed as reason:
        row = {"status": "fail", "figure": "", "detail": str(reason), "data": {}}
    except Exception as error:  # a bug, or an API the package lacks: the row says which
        row = {"status": "fail", "figure": "", "detail": f"{type(error).__name__}: {error}",
               "data": {"traceback": traceback.format_exc()}}
    return row


def check_in_subprocess(check: Check, args: argparse.Namespace, device: str, budget: float) -> dict:
    """Run ``check`` in a process of its own, within ``budget`` seconds (plus the grace its
    runs get to stop); a crash or a hang is a failed row."""
    started = time.time()
    result_file = args.work / "results" / f"{check.name}.json"
    result_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--device", device, "--work", str(args.work),
               "--data", str(args.data), "--tokenizer-file", str(args.tokenizer_file),
               "--one-check", check.name, "--deadline", str(started + budget)]
    log = args.work / "results" / f"{check.name}.log"
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                   env=child_env(args.work), start_new_session=True)
        marker = args.work / "checks" / str(process.pid)  # for stop_everything
        marker.parent.mkdir(exist_ok=True)
        marker.touch()
        timed_out = False
        try:
            process.wait(timeout=budget + GRACE_S + 10)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_group(process)
            stop_leftover_runs(running_dir(args.work, check.name))
        marker.unlink()
    if result_file.exists():
        row = json.loads(result_file.read_text())
    elif timed_out:
        row = {"status": "fail", "figure": "", "detail": f"timed out after {budget:.0f}s", "data": {}}
    else:
        row = {"status": "fail", "figure": "", "data": {},
               "detail": f"the check's process exited {process.returncode}: {last_error(log)}"}
    return {"name": check.name, "what": check.what, **row, "seconds": round(time.time() - started, 1)}


def run_checks(checks: list[Check], args: argparse.Namespace, device: str, deadline: float,
               jobs: int, on_row: Callable[[dict], None]) -> list[dict]:
    """Every check's row, in order; ``jobs`` checks at a time; ``on_row`` hears of each row as
    it comes. A check that would start too late to finish by ``deadline`` is skipped."""
    def one(check: Check) -> dict:
        left = deadline - time.time() - GRACE_S
        if left < 10:
            row = {"name": check.name, "what": check.what, "status": "skip", "figure": "", "data": {},
                   "detail": "out of time: the matrix's budget is spent", "seconds": 0.0}
        else:
            row = check_in_subprocess(check, args, device, min(check.budget_s[device], left))
        on_row(row)
        return row

    lanes = ThreadPoolExecutor(jobs)
    try:
        return list(lanes.map(one, checks))
    except KeyboardInterrupt:  # the checks and their runs have sessions of their own: stop them
        stop_everything(args.work)
        raise
    finally:
        lanes.shutdown(wait=False, cancel_futures=True)


def stop_everything(work: Path) -> None:
    """SIGTERM to every check and run still going (txtrain saves and stops, torchrun stops its
    workers), without waiting for them."""
    for marker in [*(work / "running").glob("*/*"), *(work / "checks").glob("*")]:
        if marker.name.isdigit():
            signal_group(int(marker.name), signal.SIGTERM)


def stop_leftover_runs(folder: Path) -> None:
    """txtrain runs a killed check left running (each in a process group of its own): SIGTERM,
    then SIGKILL to those still there after the grace torchrun needs to stop its workers."""
    groups = [int(marker.name) for marker in folder.glob("*") if marker.name.isdigit()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        groups = [group for group in groups if signal_group(group, sig)]
        for _ in range(GRACE_S if groups and sig == signal.SIGTERM else 0):
            time.sleep(1)
            groups = [group for group in groups if signal_group(group, 0)]  # 0: still there?
            if not groups:
                break
    shutil.rmtree(folder, ignore_errors=True)


def signal_group(group: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False if the group is gone."""
    try:
        os.killpg(group, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


PROBE = """
import json, sys
import torch
import hydra, omegaconf, txtrain
gpus = torch.cuda.device_count()
print(json.dumps({"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                  "hydra": hydra.__version__, "gpus": gpus,
                  "gpu_names": [torch.cuda.get_device_name(i) for i in range(gpus)],
                  "cpu_threads": torch.get_num_threads()}))
"""


def probe_environment(work: Path, device: str) -> dict:
    """What this machine has. The GPUs are counted in a fresh process (this one never touches
    CUDA); for --device cpu, the packages' versions are enough."""
    missing = [name for name in ("torch", "hydra", "omegaconf", "tiktoken", "numpy")
               if importlib.util.find_spec(name) is None]
    if missing:
        return {"error": f"txtrain cannot start here: no module {', '.join(missing)}"}
    if device == "cpu":
        return {"python": sys.version.split()[0], "torch": importlib.metadata.version("torch"),
                "hydra": importlib.metadata.version("hydra-core"), "gpus": 0, "gpu_names": [],
                "cpu_count": os.cpu_count()}
    try:
        done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=child_env(work),
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return {"error": "counting the GPUs took over 120 s"}
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        return {"error": f"txtrain cannot start here: {lines[-1]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict]) -> str:
    lines = ["| check | what ran | result | figure | s |", "|---|---|---|---|---|"]
    for row in rows:
        status = "FAIL" if row["status"] == "fail" else row["status"]  # stands out
        cells = [row["name"], row["what"], status, row["figure"] or row["detail"], f"{row['seconds']:.0f}"]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    notes = [f"- {row['name']}: {row['detail']}" for row in rows if row["figure"] and row["detail"]]
    return "\n".join(lines + ([""] + notes if notes else []))


def default_shared(relative: str) -> Path:
    """A file from ``shared/``: beside the project root, or inside it (where a copy of the
    working tree that carries it has it)."""
    for base in (ROOT.parent / "shared", ROOT / "shared"):
        if (base / relative).exists():
            return base / relative
    return ROOT.parent / "shared" / relative


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: cuda where a GPU is visible")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    parser.add_argument("--work", type=Path, default=Path("outputs/gpu_check"), help="where the runs go")
    parser.add_argument("--data", type=Path, default=default_shared("data/socrates"),
                        help="the Socratic dialogues, for speed-gpt2")
    parser.add_argument("--tokenizer-file", type=Path, default=default_shared("tiktoken/gpt2.tiktoken"),
                        help="GPT-2's BPE ranks (gpt2.tiktoken), for speed-gpt2")
    parser.add_argument("--only", nargs="+", metavar="CHECK", choices=[c.name for c in CHECKS],
                        help="run only these checks")
    parser.add_argument("--budget", type=float, help="seconds for the whole matrix (default: 420 on "
                        "a GPU, 900 on a CPU)")
    parser.add_argument("--jobs", type=int, help="checks at a time (default: 1 on a GPU, 2 on a CPU)")
    parser.add_argument("--one-check", help=argparse.SUPPRESS)  # in a check's own process
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.work = args.work.resolve()
    args.data, args.tokenizer_file = args.data.resolve(), args.tokenizer_file.resolve()
    return args


def write_report(out: Path, device: str, environment: dict, started: float, rows: list[dict]) -> dict:
    counts = {status: sum(row["status"] == status for row in rows) for status in ("pass", "fail", "skip")}
    report = {"device": device, "environment": environment,
              "started": datetime.fromtimestamp(started).isoformat(),
              "seconds": round(time.time() - started, 1), "counts": counts, "checks": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    return report


def exit_with_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def main() -> None:
    args = parse_args()
    if args.one_check:
        environment = json.loads((args.work / "environment.json").read_text())
        ctx = Context(args.one_check, args.device, environment.get("gpus", 0), args.work, args.deadline,
                      args.data, args.tokenizer_file)
        check = next(c for c in CHECKS if c.name == args.one_check)
        row = run_one_check(check, ctx)
        (args.work / "results" / f"{check.name}.json").write_text(json.dumps(row, indent=1) + "\n")
        return

    started = time.time()
    for earlier in ("runs", "results", "running", "checks"):  # a run found there would be taken as new
        shutil.rmtree(args.work / earlier, ignore_errors=True)
    (args.work / "results").mkdir(parents=True)
    environment = probe_environment(args.work, args.device)
    if "error" in environment:
        exit_with_error(environment["error"])
    device = args.device if args.device != "auto" else ("cuda" if environment["gpus"] else "cpu")
    if device == "cuda" and not environment["gpus"]:
        exit_with_error("--device cuda but no CUDA GPU is visible; use --device cpu")
    environment["device"] = device
    budget = args.budget or DEFAULT_BUDGET_S[device]
    (args.work / "environment.json").write_text(json.dumps(environment, indent=1) + "\n")
    print(f"gpu_check on {device}: {', '.join(environment['gpu_names']) or 'no GPU'}; torch "
          f"{environment['torch']}; runs in {args.work}", flush=True)

    checks = [check for check in CHECKS if not args.only or check.name in args.only]
    jobs = args.jobs or DEFAULT_JOBS[device]
    if jobs > 1:  # the runs share the cores rather than each spinning threads on all of them
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    done: list[dict] = []
    lock = threading.Lock()

    def on_row(row: dict) -> None:  # the report so far, should the whole command be cut short
        with lock:
            print(f"{row['name']}: {row['status']} {row['figure'] or row['detail']} ({row['seconds']:.0f}s)",
                  flush=True)
            done.append(row)
            write_report(args.out, device, environment, started, done)

    try:
        rows = run_checks(checks, args, device, started + budget, jobs, on_row)
    except KeyboardInterrupt:
        print("interrupted: the checks still running were told to stop", file=sys.stderr, flush=True)
        sys.exit(130)
    report = write_report(args.out, device, environment, started, rows)
    counts = report["counts"]
    print()
    print(markdown_table(rows))
    print(f"\n{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped in "
          f"{report['seconds']:.0f}s; report: {args.out}")
    sys.exit(1 if counts["fail"] else 0)


if __name__ == "__main__":
    main()
