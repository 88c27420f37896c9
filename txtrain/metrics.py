"""What a run reports: JSONL logs in the run dir, a progress bar, messages, and the scalars
and config for the loggers chosen besides JSONL (TensorBoard, Weights & Biases).

Only the main rank writes; the others get a logger that does nothing."""

from __future__ import annotations

import json
import logging
import os
import secrets
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from omegaconf import OmegaConf
from tqdm import tqdm

from txtrain.config import ConfigError

log = logging.getLogger("txtrain")


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool, progress: bool, start_step: int, total_steps: int,
                 loggers: Iterable[str] = (), config: dict | None = None):
        """``loggers``: ``cfg.logger`` (jsonl, which is always on, tensorboard, wandb);
        ``config``: the run's resolved config as plain values, for them to record."""
        self.enabled = enabled
        self.run_dir = run_dir
        self.run_fields: dict = {}
        self.files = {}
        self.scalar_logs: list = []  # TensorBoardLog, WandbLog
        self.failed: set[str] = set()  # outputs that could not be written: the run goes on without them
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in loggers:  # first: one that cannot start (a missing package) leaves no open file
                if name == "tensorboard":
                    self.scalar_logs.append(TensorBoardLog(run_dir / "tensorboard", config or {}))
                elif name == "wandb":
                    self.scalar_logs.append(WandbLog(run_dir, start_step, config or {}))
            for name in ("metrics", "eval"):
                drop_records_after(run_dir / f"{name}.jsonl", start_step)
            self.files = {name: open(run_dir / f"{name}.jsonl", "a", encoding="utf-8")
                          for name in ("metrics", "eval")}
        show_bar = enabled and progress and sys.stderr.isatty()
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not show_bar,
                        dynamic_ncols=True, unit="step", leave=False)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        with tqdm.external_write_mode():  # print above the bar, not through it
            log.info(message)

    def step(self, record: dict | None = None) -> None:
        """Advance the bar by one step; write ``record`` to metrics.jsonl if given."""
        self.bar.update(1)
        if record is not None and self.enabled:
            self._write("metrics", record)
            self.scalars("train", record)
            loss = record["loss"]  # None when the step's loss was not finite
            self.bar.set_postfix(loss="nan" if loss is None else f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)

    def run_info(self, **fields) -> None:
        """Add ``fields`` to run.json (written whole each time: it stays valid JSON)."""
        if self.enabled:
            self.run_fields.update(fields)

            def write() -> None:
                tmp = self.run_dir / ".run.json.tmp"
                tmp.write_text(json.dumps(self.run_fields, indent=1) + "\n")
                tmp.replace(self.run_dir / "run.json")

            self.guarded("run.json", write)

    def eval(self, record: dict) -> None:
        if self.enabled:
            self._write("eval", record)
            self.scalars("eval", record)
            self.info("eval  " + "  ".join(f"{k} {_fmt(v)}" for k, v in record.items()))

    def samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        """Append generations (prompt, continuation) to samples.txt."""
        if self.enabled and samples:
            def write() -> None:
                with (self.run_dir / "samples.txt").open("a", encoding="utf-8") as out:
                    out.write(f"=== step {step} ===\n")
                    for prompt, text in samples:
                        out.write(f"--- prompt {prompt!r} ---\n{prompt}{text}\n")

            self.guarded("samples.txt", write)

    def scalars(self, section: str, record: dict) -> None:
        """The numbers of ``record`` as scalars ``section/name`` at its step, to each logger
        besides JSONL."""
        numbers = {f"{section}/{name}": value for name, value in record.items()
                   if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)}
        for scalar_log in self.scalar_logs:
            self.guarded(scalar_log.name, lambda: scalar_log.scalars(numbers, record["step"]))

    def _write(self, name: str, record: dict) -> None:
        def write() -> None:
            handle = self.files[name]
            handle.write(json.dumps(record) + "\n")
            handle.flush()

        self.guarded(f"{name}.jsonl", write)

    def guarded(self, output: str, write) -> None:
        """One write to one of the run's outputs. One that fails (a full disk or quota, an I/O
        error) is reported once, and the run goes on without that output, as it goes on after
        a failed save: the main rank alone writes these, and a raise there would leave every
        other rank waiting in the next step's collectives."""
        if output in self.failed:
            return
        try:
            write()
        except OSError as error:
            self.failed.add(output)
            print(f"warning: writing {output} failed ({error}); training goes on without it",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
        for name, handle in self.files.items():
            try:
                handle.close()
            except OSError:  # what a failed write left in its buffer (reported then)
                pass
        for scalar_log in self.scalar_logs:
            self.guarded(scalar_log.name, scalar_log.close)


class TensorBoardLog:
    """Event files under ``folder``: the scalars, and the config as text."""

    name = "tensorboard"

    def __init__(self, folder: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logger=tensorboard needs the tensorboard package: pip install "
                              "'txtrain[tensorboard]'") from None
        self.writer = SummaryWriter(str(folder))
        self.writer.add_text("config", f"```\n{OmegaConf.to_yaml(config)}\n```")  # Markdown: keep the layout

    def scalars(self, numbers: dict, step: int) -> None:
        for name, value in numbers.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLog:
    """A Weights & Biases run, its files under ``<run dir>/wandb/``: the config, and the scalars
    at the training step. WANDB_MODE=offline logs without a network (``wandb sync`` uploads);
    WANDB_PROJECT (default txtrain), WANDB_ENTITY and WANDB_NAME choose where and what name."""

    name = "wandb"

    def __init__(self, run_dir: Path, start_step: int, config: dict):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logger=wandb needs the wandb package: pip install 'txtrain[wandb]'") from None
        try:
            # allow_val_change: a resumed run may change what may change (train.steps, ...)
            self.run = wandb.init(id=wandb_run_id(run_dir / "wandb" / "run_id", start_step), resume="allow",
                                  dir=str(run_dir), config=config, allow_val_change=True,
                                  project=os.environ.get("WANDB_PROJECT") or "txtrain")
        except wandb.errors.Error as error:  # not logged in, no network: say so in one line
            raise ConfigError(f"logger=wandb: {error} (WANDB_MODE=offline logs without an account)") from None

    def scalars(self, numbers: dict, step: int) -> None:
        # wandb's step is the training step. wandb ignores (with a warning) a step below the
        # run's last: a run resumed from its checkpoint at step N logs the steps after N again,
        # and for those that a killed process had already logged, wandb keeps the killed
        # process's values (a resume repeats their losses; only the timings differ).
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_run_id(id_file: Path, start_step: int) -> str:
    """The wandb run id of this run dir. Kept in a file in the run dir rather than derived
    from its path, so that a run dir moved or copied elsewhere still continues its wandb run.
    A run that starts at step 0 gets a new one: it starts over, as metrics.jsonl does."""
    if start_step > 0 and id_file.is_file():
        return id_file.read_text().strip()
    run_id = secrets.token_hex(4)
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id + "\n")
    return run_id


class Speed:
    """Training speed between log steps: tokens per second, milliseconds per step, and the
    share of the time spent waiting for data. Time spent evaluating and saving is left out."""

    def __init__(self, tokens: int, step: int):
        self.started = time.perf_counter()
        self.restart(tokens, step)

    def restart(self, tokens: int, step: int) -> None:
        self.clock, self.tokens, self.step, self.data_seconds = time.perf_counter(), tokens, step, 0.0

    @contextmanager
    def waiting_for_data(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.data_seconds += time.perf_counter() - start

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.clock += time.perf_counter() - start

    def measure(self, tokens: int, step: int) -> dict:
        """The speed since the last measurement (or restart), then start measuring anew."""
        seconds = time.perf_counter() - self.clock
        speed = {"tokens_per_s": (tokens - self.tokens) / seconds,
                 "step_ms": 1000 * seconds / max(1, step - self.step),
                 "data_wait": self.data_seconds / seconds}
        self.restart(tokens, step)
        return speed


def drop_records_after(path: Path, step: int) -> None:
    """A run resumed at ``step`` logs the steps after it again: drop what a killed process
    logged of them, so that each step has one record. Also a last line cut short by the kill."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    tmp.replace(path)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
