"""scripts/memory_table.py, smallest: one multi-process cell (two ranks under torchrun, one
training step under a memory profile) gives a row of planned against measured memory."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "memory_table.py"


def test_a_two_rank_cell_reports_its_plan_and_its_measured_peak(tmp_path):
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--models", "tiny", "--strategies", "ddp", "--precisions",
         "fp32", "--checkpointing", "off", "--steps", "1", "--batch-size", "4", "device=cpu"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = [line for line in result.stdout.splitlines() if line.startswith("| tiny |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:4] == ["tiny", "ddp x2", "fp32", "off"]
    planned, allocator, process, ratio = (float(cell) for cell in cells[4:])
    assert planned > 0 and allocator > 0 and process > 0
    assert 0.3 < ratio < 3, row  # a plan, not a guess
