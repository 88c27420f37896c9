"""``run.json``: what produced a run (code version, command line, software, hardware) and,
once it ends, what it achieved. The sweep summary reads it."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import torch

from txtrain.distributed import seconds_after_boot

PACKAGE_DIR = Path(__file__).resolve().parent


def run_identity(world_size: int, device: torch.device) -> dict:
    return {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "git_commit": git_commit(PACKAGE_DIR),
        "started": datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": device_name(device),
        "world_size": world_size,
    }


def git_commit(folder: Path) -> str | None:
    """The commit of the code that ran, with ``-dirty`` when it had uncommitted changes;
    None outside a git checkout (an installed package)."""
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                                  timeout=10, check=True).stdout.strip()
        commit = git("rev-parse", "HEAD")
        return commit + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({platform.processor() or platform.machine()})"


def process_age() -> float | None:
    """Seconds since this process started (Linux's /proc; None elsewhere): the start-up
    time a user waits, interpreter and imports included."""
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - seconds_after_boot("self"), 2)
    except (OSError, ValueError, IndexError):
        return None
