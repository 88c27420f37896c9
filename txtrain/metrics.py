"""What a run reports: JSONL logs in the run dir, a progress bar, and messages.

Only the main rank writes; the others get a logger that does nothing."""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from txtrain.config import ConfigError

log = logging.getLogger("txtrain")


class RunLog:
    def __init__(self, run_dir: Path, enabled: bool, progress: bool, start_step: int, total_steps: int,
                 tensorboard: bool = False):
        self.enabled = enabled
        self.run_dir = run_dir
        self.run_fields: dict = {}
        self.files = {}
        self.board = None  # TensorBoard's SummaryWriter, with logger=tensorboard
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in ("metrics", "eval"):
                drop_records_after(run_dir / f"{name}.jsonl", start_step)
            self.files = {name: open(run_dir / f"{name}.jsonl", "a", encoding="utf-8")
                          for name in ("metrics", "eval")}
            if tensorboard:
                self.board = summary_writer(run_dir / "tensorboard")
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
            tmp = self.run_dir / ".run.json.tmp"
            tmp.write_text(json.dumps(self.run_fields, indent=1) + "\n")
            tmp.replace(self.run_dir / "run.json")

    def eval(self, record: dict) -> None:
        if self.enabled:
            self._write("eval", record)
            self.scalars("eval", record)
            self.info("eval  " + "  ".join(f"{k} {_fmt(v)}" for k, v in record.items()))

    def samples(self, step: int, samples: list[tuple[str, str]]) -> None:
        """Append generations (prompt, continuation) to samples.txt."""
        if self.enabled and samples:
            with (self.run_dir / "samples.txt").open("a", encoding="utf-8") as out:
                out.write(f"=== step {step} ===\n")
                for prompt, text in samples:
                    out.write(f"--- prompt {prompt!r} ---\n{prompt}{text}\n")

    def scalars(self, section: str, record: dict) -> None:
        """The numbers of ``record`` as TensorBoard scalars ``section/name`` at its step."""
        if self.board is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.board.add_scalar(f"{section}/{name}", value, record["step"])

    def text(self, name: str, text: str) -> None:
        if self.board is not None:
            self.board.add_text(name, f"```\n{text}\n```")  # Markdown: keep the layout

    def _write(self, name: str, record: dict) -> None:
        handle = self.files[name]
        handle.write(json.dumps(record) + "\n")
        handle.flush()

    def close(self) -> None:
        self.bar.close()
        for handle in self.files.values():
            handle.close()
        if self.board is not None:
            self.board.close()


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


def summary_writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("logger=tensorboard needs the tensorboard package: pip install "
                          "'txtrain[tensorboard]' (or logger=jsonl)") from None
    return SummaryWriter(str(folder))


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
