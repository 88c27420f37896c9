"""The CPU peak txtrain reports is the one the OS reports: a real training run, in a fresh
process, against ``getrusage(RUSAGE_CHILDREN).ru_maxrss``.

The run is started by a small go-between that imports no torch, and the go-between reads the
usage: on Linux a child started with vfork (as Python's subprocess does) inherits, in its
ru_maxrss, the high-water mark of the process that started it, here pytest's, with torch
loaded. txtrain's VmHWM is its own; the go-between adds a few MB at most.
"""

import json
import os
import random
import subprocess
import sys

import pytest

MiB = 2**20
GO_BETWEEN = """
import resource, subprocess, sys
status = subprocess.run(sys.argv[1:]).returncode
print("ru_maxrss", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.exit(status)
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in KiB, VmHWM")


# How the training ends: at its last step, or (train.patience) at an evaluation that stops it
# early; what follows must not come on top of the steps' peak either way.
ENDINGS = {"last step": ["train.steps=2"],
           "early stop": ["train.steps=3", "train.eval_every=1", "train.patience=1", "train.min_delta=100"]}


@pytest.mark.parametrize("ending", ENDINGS)
def test_the_reported_cpu_peak_is_the_os_max_resident_size(tmp_path, ending):
    text = tmp_path / "text.txt"
    text.write_text("".join(random.Random(0).choice("abcdefgh \n") for _ in range(20_000)))
    # Manual attention keeps 8 heads' 512 x 512 scores of 16 windows (hundreds of MB, for
    # little arithmetic) during the two training steps, and none of it during the evaluation
    # after them, which sees one short batch. The memory the steps freed goes back to the OS
    # once they are over (keep_freed_memory, the default, kept it until then), so a reset of
    # the peak (or a peak of the evaluation only) would show; and what the evaluation, the
    # checkpoint and the plot allocate after it must not come on top of the steps' peak.
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "txtrain", "task=text", f"task.data.path={text}", "task.tokenizer=char",
               f"task.cache_dir={tmp_path / 'cache'}", "task.seq_len=512", "task.eval_tokens=512",
               "task.sample_tokens=0", "model=tiny", "model.n_layer=1", "model.n_embd=32", "model.n_head=8",
               "model.max_seq_len=512", "model.impl=manual", "model.dropout=0", "train.batch_size=16",
               "train.eval_batch_size=1", *ENDINGS[ending], "device=cpu", "progress=false", "plot=true",
               f"hydra.run.dir={run_dir}"]
    result = subprocess.run([sys.executable, "-c", GO_BETWEEN, *command], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    os_peak = int(result.stdout.split("ru_maxrss")[-1])

    [rank] = json.loads((run_dir / "memory.json").read_text())
    assert "whole run" in rank["measured_by"], rank["measured_by"]
    assert rank["measured_peak"] > rank["baseline"] + 200 * MiB  # clearly the training's
    assert abs(rank["measured_peak"] - os_peak) <= 0.01 * os_peak, (rank["measured_peak"] / MiB, os_peak / MiB)
    assert (run_dir / "loss.png").is_file() and (run_dir / "checkpoints" / "latest").is_file()
    assert json.loads((run_dir / "run.json").read_text())["result"]["step"] == 2
    log = (run_dir / "txtrain.log").read_text()
    assert "whole run" in log and "held before the model" in log
