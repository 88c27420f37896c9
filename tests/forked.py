"""Run the real command line in a fresh process, without paying for its imports each time.

A new Python process spends about 8 seconds importing torch (and torch's compiler stack, which
the optimizer's first step loads) before txtrain does anything: most of a small test run. Here
a fork server imports them once; each run is a child forked from it, so it starts with those
modules loaded and nothing else shared: its own memory, environment, working directory, argv
and output files, exactly one ``txtrain`` command, then exit. Ranks of a multi-process run are
such children too, meeting at a rendezvous address as torchrun's workers do.

What a fork cannot show (the launcher itself, signals during start-up, ``python -m txtrain``)
is tested with real subprocesses and torchrun elsewhere.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

PRELOAD = ["torch", "torch._dynamo", "torch.distributed.checkpoint", "txtrain.cli", "txtrain.train",
           "txtrain.sample", "matplotlib.figure", "matplotlib.backends.backend_agg"]
ENTRY_POINTS = {"txtrain": "txtrain.cli", "txtrain-sample": "txtrain.sample"}

_context = None


def context():
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def child(command: str, args: list[str], cwd: str, env: dict, out: str, err: str, threads: int) -> None:
    """In the forked process: become the command, as a fresh process of it would be."""
    import importlib
    import runpy
    import warnings

    import faulthandler

    faulthandler.register(signal.SIGUSR2, all_threads=True)  # a stalled run's stacks, on request
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    if "ignore" in env.get("PYTHONWARNINGS", ""):
        warnings.simplefilter("ignore")
    for fd, path in ((1, out), (2, err)):
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    sys.argv = [command, *args]
    # torch is imported already, so OMP_NUM_THREADS would come too late: apply it by hand
    threads = threads or int(env.get("OMP_NUM_THREADS", 0))
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        if command.endswith(".py"):  # a script, run as ``python script.py`` would
            sys.path.insert(0, str(Path(command).resolve().parent))
            runpy.run_path(command, run_name="__main__")
        else:
            importlib.import_module(ENTRY_POINTS[command]).main()
        status = 0
    except SystemExit as leaving:
        status = leaving.code if isinstance(leaving.code, int) else (0 if leaving.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    import resource

    Path(out).with_name("maxrss").write_text(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    os._exit(status)  # no atexit handlers inherited from the fork server


class Forked:
    """One forked command, handled like a ``subprocess.Popen``: ``pid``, ``poll()``, ``wait()``,
    ``send_signal()``, ``kill()``, ``communicate()`` (its output comes from files)."""

    def __init__(self, command: str, args: list[str], cwd: Path, env: dict, threads: int = 0):
        self.args = [command, *map(str, args)]
        self.logs = Path(tempfile.mkdtemp(prefix="forked-"))
        self.out, self.err = self.logs / "out", self.logs / "err"
        self.process = context().Process(target=child, args=(command, self.args[1:], str(cwd), env,
                                                             str(self.out), str(self.err), threads))
        self.process.start()
        self.pid = self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.exitcode  # negative: killed by that signal, as with Popen

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the end (raising ``subprocess.TimeoutExpired`` after ``timeout`` seconds,
        the process left running); its exit status."""
        self.process.join(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the end, as ``wait`` does; its stdout and stderr. (``maxrss``: its peak
        resident size in KiB, where it ended by itself.)"""
        self.wait(timeout)
        output = tuple(path.read_text(errors="replace") for path in (self.out, self.err))
        peak = self.logs / "maxrss"
        self.maxrss = int(peak.read_text()) if peak.is_file() else None
        shutil.rmtree(self.logs, ignore_errors=True)
        return output

    def finish(self, timeout: float | None = None) -> subprocess.CompletedProcess:
        try:
            stdout, stderr = self.communicate(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.process.join()
            raise
        done = subprocess.CompletedProcess(self.args, self.returncode, stdout, stderr)
        done.maxrss = self.maxrss
        return done


def start(args, cwd: Path, env: dict | None = None, command: str = "txtrain", rank: int | None = None,
          ranks: int = 1, port: int = 0) -> Forked:
    """Start ``command *args`` (a command of ENTRY_POINTS, or a script's path) in a forked
    process; with ``rank``, as that rank of ``ranks`` meeting at the store on ``port``, as
    under torchrun."""
    env = dict(os.environ if env is None else env)
    env.pop("HYDRA_FULL_ERROR", None)
    threads = 0
    if rank is not None:
        env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                   LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
        threads = 1  # what torchrun sets for several processes on one machine
    return Forked(command, args, cwd, env, threads)


def run(args, cwd: Path, env: dict | None = None, timeout: float = 300, command: str = "txtrain",
        ranks: int = 1) -> list[subprocess.CompletedProcess]:
    """``command *args`` in ``ranks`` forked processes (one rank each when ``ranks`` > 1, as
    torchrun would start them), to the end; their outcomes in rank order.

    As under torchrun, the rendezvous store is the launcher's (this process's, on a port the
    system chose, so no other process can hold it), and the ranks connect to it; when one
    rank fails, the others are stopped rather than left waiting for it.

    Now and then (about one full suite in four) forked ranks stall with none failed,
    a thing never seen of the same runs under torchrun; the cause is not found yet. A group
    that makes no end within STALLED_S, with no rank failed, is stopped, its ranks' stacks
    are reported as a warning (faulthandler, on SIGUSR2), and it runs once more from a clean
    run dir."""
    if ranks == 1:
        return [start(args, cwd, env, command).finish(timeout)]
    outcomes, stalled = run_group(args, cwd, env, min(timeout, STALLED_S), command, ranks)
    if stalled:
        stacks = "\n".join(f"[rank {rank}] {o.stderr[-3000:]}" for rank, o in enumerate(outcomes))
        warnings.warn(f"forked ranks of `{command} {' '.join(map(str, args))}` stalled; run again once. "
                      f"Their stacks:\n{stacks}")
        for arg in map(str, args):
            if arg.startswith("hydra.run.dir="):
                shutil.rmtree(Path(cwd) / arg.split("=", 1)[1], ignore_errors=True)
        outcomes, _ = run_group(args, cwd, env, timeout, command, ranks)
    return outcomes


STALLED_S = 90  # a group of the tests' runs ends within a minute, even on a busy machine


def run_group(args, cwd: Path, env: dict | None, timeout: float, command: str,
              ranks: int) -> tuple[list[subprocess.CompletedProcess], bool]:
    """One try of ``run``: the outcomes, and whether the group stalled (every rank still
    running at ``timeout``, none failed)."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, ranks, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=timeout))
    started = [start(args, cwd, env, command, rank, ranks, store.port) for rank in range(ranks)]
    stalled = False
    try:
        deadline = time.monotonic() + timeout
        while any(p.returncode is None for p in started):
            if any(p.returncode not in (None, 0) for p in started):
                for process in started:  # give the others a moment to end on their own, then stop them
                    try:
                        process.wait(10)
                    except subprocess.TimeoutExpired:
                        process.kill()
                break
            if time.monotonic() > deadline:
                # none failed: some still running (a rank that ended well may have left
                # another stuck in its teardown: seen once, rank 0 done, rank 1 in C code
                # freeing the run's objects after the last collective had passed)
                stalled = all(p.returncode in (None, 0) for p in started)
                for process in started:
                    process.send_signal(signal.SIGUSR2)  # faulthandler writes each thread's stack
                time.sleep(2)
                for process in started:
                    process.kill()
                break
            time.sleep(0.05)
        return [process.finish(60) for process in started], stalled
    finally:
        for process in started:
            if process.returncode is None:
                process.kill()
        del store
