"""Stopping on request: SIGTERM, SIGINT (Ctrl-C) or a cluster's pre-emption signal make the run
finish its current step, save a checkpoint and exit with ``INTERRUPTED_STATUS``; rerunning the
same command continues exactly. A second SIGINT stops at once.

A request that comes during start-up (loading torch, building the model: seconds) is held until
just before training, which then does not start: the run exits with ``INTERRUPTED_STATUS``
too, and the same command starts it later.

Under several processes the signal may reach some ranks before others, so the ranks agree on
stopping (a one-number all-reduce per step) and all stop after the same step.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

INTERRUPTED_STATUS = 75  # EX_TEMPFAIL: try again later (a scheduler may requeue the job)


class Interrupted(Exception):
    """Training stopped on request after ``step``, with a checkpoint saved."""

    def __init__(self, step: int, signal_name: str, checkpoint, earlier_checkpoint=None):
        saved = (f"checkpoint {checkpoint} saved" if checkpoint is not None else
                 f"its checkpoint could not be saved, the latest is {earlier_checkpoint or 'none yet'}")
        super().__init__(f"stopped by {signal_name} after step {step}; {saved}; "
                         "run the same command again to continue")


class NotStarted(Exception):
    """Asked to stop before training started: nothing to save."""

    def __init__(self, signal_name: str):
        super().__init__(f"stopped by {signal_name} before training started; run the same command "
                         "again to start it")


# The StopRequests in force, outermost first: one for start-up, one for the training loop.
watching: list["StopRequests"] = []


class StopRequests:
    """Catches the stop signals while it is in force (as a context manager): during start-up
    (``starting=True``), or while training runs. A request caught by an enclosing one (during
    start-up) counts for this one too."""

    def __init__(self, extra_signal: str | None = None, starting: bool = False):
        names = ["SIGTERM", "SIGINT"] + ([extra_signal] if extra_signal else [])
        self.signals = [getattr(signal, name) for name in names if hasattr(signal, name)]
        self.starting = starting
        self.received: str | None = None
        self.previous: dict = {}

    def __enter__(self) -> "StopRequests":
        self.received = next((outer.received for outer in watching if outer.received), None)
        for sig in self.signals:
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread: signals stay as they were
                pass
        watching.append(self)
        return self

    def __exit__(self, *exc) -> None:
        watching.remove(self)
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, sig: int, frame: FrameType | None) -> None:
        if self.received is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: no waiting for the step
        self.received = signal.Signals(sig).name
        if sig == signal.SIGINT:
            doing = ("stopping before training starts" if self.starting
                     else "finishing this step and saving a checkpoint")
            print(f"\n{self.received}: {doing} (Ctrl-C again to quit at once)", file=sys.stderr,
                  flush=True)

    def agreed(self, device) -> bool:
        """True on every rank once any rank was asked to stop."""
        import torch  # not at import: the command line loads torch only once the config is good
        import torch.distributed as dist

        wanted = self.received is not None
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([float(wanted)], device=device)
            dist.all_reduce(flag)
            if flag.item() > 0 and self.received is None:
                self.received = "a stop request to another rank"
            return flag.item() > 0
        return wanted
