"""The command line: user mistakes give one `error:` line and exit 2; a run writes its run dir."""

import json

import pytest

from conftest import run_txtrain

SHORT = ["train.steps=4", "train.log_every=2", "train.eval_every=2", "train.save_every=2",
         "task.n_eval=50", "model.n_layer=1", "model.n_embd=32"]


@pytest.mark.parametrize("overrides,fragment", [
    (["model=nope"], "model/nope"),                                    # unknown group option
    (["model.n_layerz=3"], "n_layerz"),                                # unknown key
    (["train.steps=lots"], "train.steps"),                             # wrong type
    (["model.pos=absolute"], "absolute"),                              # not one of the choices
    (["model.n_embd=100", "model.n_head=3"], "not divisible"),         # impossible value
    (["train.batch_size=0"], "batch_size must be positive"),
    (["train.steps=-5"], "steps must be positive"),
    (["train.batch_size=64", "train.micro_batch_size=48"], "micro_batch_size=48"),
    (["task.min_len=9", "task.max_len=3"], "larger than"),
    (["task.max_len=200"], "max_seq_len"),                             # past the learned table
    (["resume=no/such/checkpoint"], "no such file"),
    (["train.steps="], "train.steps"),                                 # empty value
    (["optim.lr=-1"], "lr must be positive"),
    (["task.max_len=2", "task.n_eval=1000"], "n_eval"),
    (["model.dropout=2"], "dropout"),
    (["+model.widht=3"], "unknown key 'model.widht'"),                # added keys are checked too
    (["train.steps=[1"], "no viable alternative"),                     # bad override syntax
    (["train.steps=1", "device=cuda:7"] , "device"),
    (["parallel=ddp"], "launch.nproc_per_node=2"),                     # needs a launcher
    (["parallel=fsdp"], "launch.nproc_per_node=2"),
    (["parallel=pipeline", "parallel.schedule=zigzag"], "zigzag"),
    (["parallel=pipeline", "parallel.stages_per_rank=2"], "interleaved"),
    (["parallel=fsdp", "parallel.replicate=0"], "replicate must be positive"),
])
def test_user_errors_are_one_line_with_status_2(tmp_path, overrides, fragment):
    result = run_txtrain("train.steps=1", *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_a_run_writes_its_run_dir_and_resumes_from_it(tmp_path):
    run_dir = tmp_path / "run"
    result = run_txtrain(*SHORT, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [2, 4]
    assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= metrics[0].keys()
    evals = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4] and "exact_match" in evals[0]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000004"
    assert (run_dir / "checkpoints" / "step_000002" / "meta.pt").is_file()
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith("done: step 4") and "exact_match" in summary
    assert "parameters" in result.stdout

    # Asking for more steps in the same run dir continues from step 4 (resume=auto).
    more = run_txtrain(*SHORT, "train.steps=6", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert "resumed from" in more.stdout
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]

    # A different model cannot resume from these weights: a one-line error.
    other = run_txtrain(*SHORT, "model.n_embd=64", "train.steps=8", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert other.returncode == 2 and other.stderr.startswith("error: checkpoint")
    assert "n_embd 32 -> 64" in other.stderr


def test_help_lists_the_config_groups(tmp_path):
    result = run_txtrain("--help", cwd=tmp_path)
    assert result.returncode == 0
    for group in ("model", "task", "parallel", "precision", "optim", "schedule"):
        assert f"{group}:" in result.stdout or f"{group}: " in result.stdout
