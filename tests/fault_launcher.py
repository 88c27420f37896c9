"""txtrain with faults injected on chosen ranks: run by torchrun from tests/test_checkpoint_faults.py.

``FAULT_PLAN`` (JSON) lists the runs to make one after another in this process, each a call of
``txtrain.cli.main()``::

    [{"args": [...overrides], "faults": {"<phase>": [{"ranks": [0, 1], "steps": [3]}, ...]},
      "other_host": [1], "stop": {"rank": 1, "step": 9}}, ...]

A phase names the function that fails (see ``TARGETS``); ``steps`` (saves only) limits it to
the saves of those steps. ``other_host`` ranks pretend to run on a node of their own; ``stop``
sends SIGTERM to that rank during that step. Only the last run may end well: a run that ends
well closes the process group. What each run did on this rank (exit status, the error it
reported, each save's outcome, how many checkpoints it hashed, any exception that escaped) is
appended to ``FAULT_RECORD/rank<R>.jsonl``; the process exits with the last run's status.
"""

import contextlib
import errno
import io
import json
import os
import signal
import socket
import sys

from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

from txtrain import checkpoint, cli
from txtrain.train import Trainer

RANK = int(os.environ["RANK"])
WRITE_ERROR = OSError(errno.ENOSPC, "No space left on device (injected)")
READ_ERROR = OSError(errno.EIO, "Input/output error (injected)")
# phase: (owner, attribute, error). The write of the state fails inside
# torch.distributed.checkpoint's own writer, as a full disk would.
TARGETS = {
    "prepare": (checkpoint.Checkpoints, "prepare", WRITE_ERROR),
    "state": (FileSystemWriter, "write_data", WRITE_ERROR),
    "meta": (checkpoint, "write_meta", WRITE_ERROR),
    "manifest": (checkpoint, "write_manifest", WRITE_ERROR),
    "publish": (checkpoint.Checkpoints, "publish", WRITE_ERROR),
    "prune": (checkpoint.Checkpoints, "prune", WRITE_ERROR),
    "find": (checkpoint, "verify", READ_ERROR),
    "meta_read": (checkpoint, "read_meta", READ_ERROR),
    "state_read": (FileSystemReader, "read_data", READ_ERROR),
}
now = {"step": None, "faults": {}, "record": {}}


def injected(phase: str, original):
    def maybe_fail(*args, **kwargs):
        for fault in now["faults"].get(phase, []):
            if RANK in fault["ranks"] and now["step"] in fault.get("steps", [now["step"]]):
                raise TARGETS[phase][2]
        return original(*args, **kwargs)
    return maybe_fail


def install_faults() -> None:
    for phase, (owner, name, _) in TARGETS.items():
        if hasattr(owner, name):  # the code under test may not have it
            setattr(owner, name, injected(phase, getattr(owner, name)))


def install_recorders() -> None:
    save, verify, report = checkpoint.Checkpoints.save, checkpoint.verify, cli.exit_with_user_error
    train_step = Trainer.train_step

    def recorded_save(self, step, *args, **kwargs):
        now["step"] = step
        try:
            path = save(self, step, *args, **kwargs)
        except BaseException as error:
            now["record"]["saves"].append([step, f"{type(error).__name__}: {error}"])
            raise
        now["record"]["saves"].append([step, "saved"])
        return path

    def counted_verify(*args, **kwargs):
        now["record"]["hashed"] += 1
        return verify(*args, **kwargs)

    def recorded_report(error, *args, **kwargs):
        now["record"]["error"] = cli.describe_error(error)
        return report(error, *args, **kwargs)

    def step_and_maybe_stop(self, batch, lr):
        stop = now["stop"]
        if stop and stop["rank"] == RANK and self.step + 1 == stop["step"]:
            os.kill(os.getpid(), signal.SIGTERM)  # caught; the run stops after this step
        return train_step(self, batch, lr)

    checkpoint.Checkpoints.save = recorded_save
    checkpoint.verify = counted_verify
    cli.exit_with_user_error = recorded_report
    Trainer.train_step = step_and_maybe_stop


def pretend_other_host(ranks: list[int]) -> None:
    host = f"node-of-rank-{RANK}" if RANK in ranks else "node-of-rank-0"
    socket.gethostname = lambda: host


class Tee(io.StringIO):
    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(text)
        return super().write(text)

    def flush(self) -> None:
        self.stream.flush()


def run(plan: dict) -> int:
    from hydra.core.global_hydra import GlobalHydra

    now.update(step=None, faults=plan.get("faults", {}), stop=plan.get("stop"),
               record={"status": 0, "error": None, "saves": [], "hashed": 0, "escaped": None, "stderr": ""})
    pretend_other_host(plan.get("other_host", []))
    sys.argv = ["txtrain", *plan["args"]]
    stderr = Tee(sys.stderr)
    try:
        with contextlib.redirect_stderr(stderr):
            cli.main()
    except SystemExit as leaving:
        now["record"]["status"] = leaving.code if isinstance(leaving.code, int) else 1
    except BaseException as error:  # a bug: record it, then let it end the process as it would
        now["record"]["escaped"] = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        raise
    finally:
        now["record"]["stderr"] = stderr.getvalue()
        with open(os.path.join(os.environ["FAULT_RECORD"], f"rank{RANK}.jsonl"), "a") as out:
            out.write(json.dumps(now["record"]) + "\n")
        GlobalHydra.instance().clear()
    return now["record"]["status"]


def main() -> None:
    install_faults()
    install_recorders()
    status = 0
    for plan in json.loads(os.environ["FAULT_PLAN"]):
        status = run(plan)
    sys.exit(status)


if __name__ == "__main__":
    main()
