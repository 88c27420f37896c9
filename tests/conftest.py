import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from txtrain.cli import to_config
from txtrain.config import Config, register_configs

SHARED = Path(__file__).resolve().parents[2] / "shared"


def make_config(*overrides: str) -> Config:
    """Compose the config exactly as the command line would, from overrides."""
    register_configs()
    with initialize_config_module("txtrain.configs", version_base=None):
        raw = compose("train", overrides=["progress=false", *overrides])
    return to_config(raw)


def run_txtrain(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real command line in a fresh process."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "txtrain", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def config():
    return make_config
