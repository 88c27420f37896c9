"""scripts/gpu_check.py, the GPU acceptance matrix, run scaled down on a CPU: every row is
there, the checks that apply on a CPU pass, the others say why they were skipped. And a run
that hangs is stopped at its time limit instead of taking the whole matrix with it."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
ON_A_CPU = {
    "reverse-fp32": "pass",
    "reverse-bf16": "skip",
    "reverse-fp16": "skip",
    "ddp-vs-none": "pass",
    "fsdp-vs-none": "pass",
    "dp-bf16": "skip",
    "activation-checkpointing": "pass",
    "checkpoint-gpu-to-cpu": "pass",  # cpu -> cpu here
    "checkpoint-cpu-to-gpu": "skip",
    "cuda-rng-fewer-devices": "skip",
    "memory-plan": "pass",
    "speed-gpt2": "pass",  # model=tiny on a generated text here
    "compile": "skip",
}


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_matrix_runs_on_a_cpu_and_every_check_that_applies_passes(tmp_path):
    out = tmp_path / "gpu_check.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out),
                           "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900)
    report = json.loads(out.read_text())
    rows = {row["name"]: row for row in report["checks"]}
    assert {name: row["status"] for name, row in rows.items()} == ON_A_CPU, done.stdout[-4000:]
    assert done.returncode == 0, done.stderr[-2000:]
    assert report["device"] == "cpu" and report["counts"] == {"pass": 7, "fail": 0, "skip": 6}

    for name in ("ddp-vs-none", "fsdp-vs-none", "activation-checkpointing", "checkpoint-gpu-to-cpu"):
        assert rows[name]["data"]["max_relative_difference"] <= rows[name]["data"]["tolerance"]
    assert set(rows["checkpoint-gpu-to-cpu"]["data"]["losses"]) == {str(s) for s in range(7, 13)}
    assert rows["reverse-fp32"]["data"]["evaluations"][-1]["exact_match"] >= 0.99
    speed = rows["speed-gpt2"]["data"]
    assert speed["tokens_per_s"] > 0 and 0 < speed["mfu_measured_peak"] < 1.5
    assert speed["flops_per_token"] > 0 and speed["memory"][0]["planned"] > 0
    assert all(row["detail"] for row in rows.values() if row["status"] == "skip")

    table = done.stdout[done.stdout.index("| check |"):]
    for name, status in ON_A_CPU.items():
        assert f"| {name} |" in table and f"| {status} |" in table.split(f"| {name} |")[1].splitlines()[0]


def test_a_run_that_hangs_is_stopped_at_its_time_limit(tmp_path):
    gpu_check = load_gpu_check()
    run = gpu_check.Run(tmp_path / "runs" / "hangs")
    started = time.time()
    running = tmp_path / "running"
    run.make([sys.executable, "-c", "import time; time.sleep(600)"], None, timeout=1, work=tmp_path,
             running=running)
    assert time.time() - started < 20
    record = json.loads(run.record.read_text())
    assert record["status"] != 0 and record["error"].startswith("timed out")
    assert not list(running.iterdir())  # nothing left for the main process to stop
    try:
        run.finished()
    except gpu_check.Failed as failure:
        assert "hangs: timed out" in str(failure)
    else:
        raise AssertionError("a run that timed out counted as finished")


def test_a_check_whose_process_dies_is_a_failed_row_that_says_why(tmp_path):
    gpu_check = load_gpu_check()
    (tmp_path / "results").mkdir()
    (tmp_path / "environment.json").write_text('{"gpus": 0}')
    args = SimpleNamespace(work=tmp_path, data=tmp_path, tokenizer_file=tmp_path)
    unknown = gpu_check.Check("no-such-check", lambda ctx: None, {"cpu": 60})  # its process cannot find it
    row = gpu_check.check_in_subprocess(unknown, args, "cpu", 60)
    assert row["status"] == "fail" and row["name"] == "no-such-check"
    assert "exited 1" in row["detail"] and "StopIteration" in row["detail"]


def test_runs_left_behind_by_a_killed_check_are_stopped(tmp_path):
    gpu_check = load_gpu_check()
    # A run in a process group of its own whose parent, the check, is gone: a shell starts it
    # in the background and leaves.
    sleeper = f"{sys.executable} -c 'import time; time.sleep(600)' >/dev/null 2>&1 &"
    shell = subprocess.run(["sh", "-c", f"{sleeper} echo $$ $!"], capture_output=True, text=True,
                           start_new_session=True, timeout=30)
    group, pid = map(int, shell.stdout.split())
    running = gpu_check.running_dir(tmp_path, "killed-check")
    running.mkdir(parents=True)
    (running / str(group)).touch()
    started = time.time()
    gpu_check.stop_leftover_runs(running)
    assert time.time() - started < 10 and not running.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
