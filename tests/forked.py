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
import socket
import subprocess
import sys
import tempfile
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
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        if command.endswith(".py"):  # a script, run as ``python script.py`` would
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
    os._exit(status)  # no atexit handlers inherited from the fork server


def run(args, cwd: Path, env: dict | None = None, timeout: float = 300, command: str = "txtrain",
        ranks: int = 1) -> list[subprocess.CompletedProcess]:
    """``command *args`` (a command of ENTRY_POINTS, or a script's path) in ``ranks`` forked
    processes (one rank each when ``ranks`` > 1, as
    torchrun would start them); their outcomes in rank order. A run past ``timeout`` seconds is
    killed and raises ``subprocess.TimeoutExpired``."""
    base = dict(os.environ if env is None else env)
    base.pop("HYDRA_FULL_ERROR", None)
    if ranks > 1:
        base.update(WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()))
    logs = Path(tempfile.mkdtemp(prefix="forked-"))
    processes = []
    for rank in range(ranks):
        rank_env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank)) if ranks > 1 else base
        files = (str(logs / f"{rank}.out"), str(logs / f"{rank}.err"))
        process = context().Process(target=child, args=(command, [str(a) for a in args], str(cwd),
                                                        rank_env, *files, 1 if ranks > 1 else 0))
        process.start()
        processes.append((process, files))
    try:
        for process, _ in processes:
            process.join(timeout)
            if process.exitcode is None:
                raise subprocess.TimeoutExpired([command, *map(str, args)], timeout)
    finally:
        for process, _ in processes:
            if process.exitcode is None:
                process.kill()
                process.join()
    done = [subprocess.CompletedProcess([command, *map(str, args)], process.exitcode,
                                        Path(out).read_text(errors="replace"),
                                        Path(err).read_text(errors="replace"))
            for process, (out, err) in processes]
    for path in logs.iterdir():
        path.unlink()
    logs.rmdir()
    return done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
