"""The benchmark's yardstick and its report: scripts/reference.py trains exactly the model
txtrain trains, and scripts/bench.py reports every figure it promises."""

import ast
import importlib.util
import json
import pickle
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import forked
from conftest import make_config
from txtrain.model import Transformer
from txtrain.tasks import build_task
from txtrain.train import Trainer

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
WORDS = "the quick brown fox jumps over the lazy dog while socrates asks what justice is. "
MiB = 2**20
# nanoGPT's train.py as bench.py sees it: the lines it prints, and a resident peak of its own
FAKE_NANOGPT_TRAIN = """
import os, sys
print("cwd", os.getcwd())
print("argv", *sys.argv[1:])
held = b"x" * (96 * 2**20)
for it, ms in enumerate([900.0, 210.0, 190.0, 200.0, 400.0]):  # iteration 0 holds the evaluation
    print(f"iter {it}: loss {4 - it / 10:.4f}, time {ms:.2f}ms, mfu -100.00%")
"""


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text_run(tmp_path: Path, *extra: str) -> list[str]:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(WORDS * 200)
    return ["task=text", f"task.data.path={corpus}", "task.tokenizer=bytes", f"task.cache_dir={tmp_path / 'cache'}",
            "task.seq_len=16", "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.max_seq_len=16",
            "train.batch_size=4", "schedule.warmup_steps=2", "optim.lr=3e-3", *extra]


def test_the_reference_loop_trains_the_same_model_the_same_way(tmp_path):
    reference, bench = load_script("reference"), load_script("bench")
    cfg = make_config(*text_run(tmp_path, "train.steps=6", "train.log_every=1", "train.eval_every=0",
                                        "train.save_every=0"))
    trainer = Trainer(cfg, tmp_path / "run")
    torch.manual_seed(cfg.seed)  # the initial weights the trainer built
    gpt = bench.reference_with_weights(reference, Transformer(cfg.model, trainer.task.vocab_size),
                                       trainer.task.vocab_size)
    inputs = torch.randint(0, trainer.task.vocab_size, (2, 16))
    torch.testing.assert_close(gpt(inputs), trainer.model(inputs), rtol=1e-5, atol=1e-5)

    trainer.fit()
    ours = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    o, t, s = cfg.optim, cfg.train, cfg.schedule
    args = SimpleNamespace(device="cpu", precision="fp32", compile=False, lr=o.lr, weight_decay=o.weight_decay,
                           beta1=o.beta1, beta2=o.beta2, eps=o.eps, grad_clip=t.grad_clip, steps=t.steps,
                           warmup_steps=s.warmup_steps, min_lr_ratio=s.min_lr_ratio)
    batches = ((b.inputs, b.targets) for b in (trainer.task.train_batch(step, t.batch_size) for step in range(t.steps)))
    theirs = [loss for loss, _ in reference.train(gpt, reference.make_optimizer(gpt, args), batches, args)]
    assert len(ours) == len(theirs) == 6 and ours[-1] < ours[0]
    assert theirs == pytest.approx(ours, rel=1e-5)


def test_bench_reports_speed_mfu_memory_data_wait_and_start_up(tmp_path):
    out = tmp_path / "bench"
    # bench.py as ``python bench.py`` runs it, in a process forked with torch already imported
    # (tests/forked.py); the runs it times are fresh processes of their own, as always.
    [done] = forked.run(["--steps", "2", "--warmup", "1", "--pairs", "1", "--interleaved-steps", "2",
                         "--no-defaults", "--out", str(out), *text_run(tmp_path)], tmp_path, timeout=300,
                        command=str(SCRIPTS / "bench.py"))
    assert done.returncode == 0, done.stderr + done.stdout
    assert "MFU" in done.stdout and "ratio" in done.stdout
    result = json.loads((out / "bench.json").read_text())
    layers, width, seq, vocab = 2, 32, 16, 256
    assert result["flops_per_token"] == 6 * (layers * 12 * width**2 + vocab * width) + 12 * layers * seq * width
    assert result["matmul_peak_flops"] > 1e8
    for side in ("txtrain", "reference"):
        figures = result[side]
        assert figures["tokens_per_s"] > 0 and len(figures["tokens_per_s_per_run"]) == 1
        assert figures["step_ms_p10_p90"][0] <= figures["step_ms_median"] <= figures["step_ms_p10_p90"][1]
        assert 0 < figures["mfu"] < 2 and figures["peak_memory_bytes"] > 2**20
    assert result["ratio"] == pytest.approx(result["txtrain"]["tokens_per_s"] / result["reference"]["tokens_per_s"])
    assert 0 <= result["txtrain"]["data_wait"] < 1
    assert 0 < result["txtrain"]["startup_s"] < 120
    turns = result["interleaved"]  # the same weights and batches: the same losses
    assert len(turns["losses"]["txtrain"]) == 3 and turns["ratio"] > 0
    assert turns["losses"]["reference"] == pytest.approx(turns["losses"]["txtrain"], rel=1e-5)


def test_bench_says_why_it_cannot_run_the_reference(tmp_path):
    bench = load_script("bench")
    cfg = make_config(*text_run(tmp_path, "model.pos=rope", "optim=sgd"))
    reason = bench.reference_mismatch(cfg)
    assert "GPT-2-like" in reason and "adamw" in reason
    assert bench.reference_mismatch(make_config(*text_run(tmp_path))) is None


def test_bench_times_nanogpt_by_the_lines_its_train_py_prints(tmp_path):
    bench = load_script("bench")
    nanogpt = tmp_path / "nanogpt"
    nanogpt.mkdir()
    (nanogpt / "train.py").write_text(FAKE_NANOGPT_TRAIN)
    cfg = make_config(*text_run(tmp_path, "model.bias=false"))
    assert bench.nanogpt_mismatch(cfg, "cpu") is None
    settings = bench.nanogpt_settings(cfg, "cpu", tmp_path / "data", tmp_path / "run", warmup=2, steps=3)
    run = bench.run_nanogpt(nanogpt, settings, tmp_path / "nanogpt.log", warmup=2)

    assert run["step_seconds"] == pytest.approx([0.19, 0.2, 0.4])  # iterations 0 and 1 warm up
    assert run["tokens_per_s"] == pytest.approx(4 * 16 / 0.2)  # batch x window / median step
    assert run["losses"] == pytest.approx([4.0, 3.9, 3.8, 3.7, 3.6])
    # its own peak, not this process's (torch loaded), which a child started by vfork inherits
    assert 96 * MiB < run["max_rss_bytes"] == run["peak_memory_bytes"] < 160 * MiB
    log = (tmp_path / "nanogpt.log").read_text().splitlines()
    assert f"cwd {nanogpt}" in log  # its configurator.py is read from its working directory
    options = dict(option.removeprefix("--").split("=") for option in log[1].split()[1:])
    assert options["dataset"] == str(tmp_path / "data") and options["out_dir"] == str(tmp_path / "run")
    assert (options["bias"], options["compile"], options["dtype"], options["device"]) == ("False", "False",
                                                                                      "float32", "cpu")
    assert (options["batch_size"], options["block_size"], options["n_layer"], options["n_embd"]) == ("4", "16", "2", "32")
    assert (options["max_iters"], options["eval_interval"], options["eval_iters"]) == ("4", "5", "1")
    # nanoGPT's configurator keeps each option's type: floats must read as floats
    assert all(type(ast.literal_eval(options[key])) is float for key in ("learning_rate", "grad_clip", "dropout"))

    ours = [{"tokens_per_s": speed, "max_rss_bytes": memory * run["max_rss_bytes"]}
            for speed, memory in ((160.0, 2.0), (480.0, 1.5), (320.0, 1.0))]
    vs = bench.versus(ours, [run] * 3, "nanogpt")
    assert vs["ratio_per_pair"] == pytest.approx([0.5, 1.5, 1.0]) and vs["ratio"] == pytest.approx(1.0)
    assert vs["max_rss_ratio_per_pair"] == pytest.approx([2.0, 1.5, 1.0]) and vs["max_rss_ratio"] == pytest.approx(1.5)
    assert vs["tokens_per_s_per_pair"]["nanogpt"] == [run["tokens_per_s"]] * 3

    assert "max_seq_len" in bench.nanogpt_mismatch(make_config(*text_run(tmp_path, "model.max_seq_len=32")), "cpu")
    assert "adamw" in bench.nanogpt_mismatch(make_config(*text_run(tmp_path, "optim=sgd")), "cpu")


def test_nanogpt_reads_the_tokens_txtrain_trains_on(tmp_path):
    bench = load_script("bench")
    cfg = make_config(*text_run(tmp_path, "task.tokenizer=char"))
    task = build_task(cfg.task, cfg.seed, progress=False)
    folder = bench.nanogpt_data(task, tmp_path / "data")
    for name, tokens in (("train.bin", task.train_tokens), ("val.bin", task.val_tokens)):
        ids = np.fromfile(folder / name, dtype=np.uint16)
        np.testing.assert_array_equal(ids, tokens.read(0, len(tokens)))
    vocabulary = pickle.loads((folder / "meta.pkl").read_bytes())["vocab_size"]
    assert vocabulary == task.vocab_size == len(set(WORDS))  # the corpus's characters, padded by neither


def test_a_nanogpt_folder_without_train_py_is_a_one_line_error(tmp_path, monkeypatch):
    bench = load_script("bench")
    monkeypatch.setattr(sys, "argv", ["bench.py", "--nanogpt", str(tmp_path), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as stop:
        bench.main()
    message = str(stop.value.code)
    assert message.startswith("error:") and "train.py" in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # said before anything ran
