"""scripts/memory_table.py, smallest: one multi-process cell (two ranks under torchrun, one
training step under a memory profile) gives a row of planned against measured memory."""

import os
from pathlib import Path

import forked

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "memory_table.py"


def test_a_two_rank_cell_reports_its_plan_and_its_measured_peak(tmp_path):
    # The table's own process, as ``python memory_table.py`` runs it, forked (tests/forked.py);
    # the cell's two ranks are a real torchrun job, as always.
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    [result] = forked.run(
        ["--models", "tiny", "--strategies", "ddp", "--precisions", "fp32", "--checkpointing", "off",
         "--steps", "1", "--batch-size", "4", "device=cpu"],
        tmp_path, env, timeout=120, command=str(SCRIPT))
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = [line for line in result.stdout.splitlines() if line.startswith("| tiny |")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[:4] == ["tiny", "ddp x2", "fp32", "off"]
    planned, allocator, process, ratio = (float(cell) for cell in cells[4:])
    assert planned > 0 and allocator > 0 and process > 0
    assert 0.3 < ratio < 3, row  # a plan, not a guess
