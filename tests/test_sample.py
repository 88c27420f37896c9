"""txtrain-sample on what users actually have: a checkpoint whose tokenizer file has moved, a run
dir without checkpoints, a prompt longer than the window the model was trained on."""

import shutil

import pytest

from conftest import SHARED
from txtrain.sample import main as sample
from txtrain.train import Trainer
from conftest import make_config

GPT2_RANKS = SHARED / "tiktoken" / "gpt2.tiktoken"
R50K_CACHE_KEY = "0ea1e91bbb3a60f729a8dc8f777fd2fc07cd8df4"  # tiktoken's cache name for r50k_base


def run_sample(capsys, *args: str) -> tuple[int, str, str]:
    status = 0
    try:
        sample(list(args))
    except SystemExit as leaving:
        status = leaving.code
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.skipif(not GPT2_RANKS.is_file(), reason=f"the GPT-2 ranks are not at {GPT2_RANKS}")
def test_a_moved_ranks_file_is_found_in_tiktokens_cache(tmp_path, capsys, monkeypatch):
    ranks = tmp_path / "ranks" / "gpt2.tiktoken"
    ranks.parent.mkdir()
    shutil.copy(GPT2_RANKS, ranks)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("SOCRATES: What is justice? MENO: I do not know, Socrates.\n" * 40)
    run = tmp_path / "run"
    Trainer(make_config("task=text", f"task.data.path={corpus}", f"task.tokenizer_file={ranks}",
                        f"task.cache_dir={tmp_path / 'cache'}", "task.seq_len=16", "task.prompts=[]",
                        "model.n_layer=1", "model.n_embd=32", "model.max_seq_len=16", "train.steps=1",
                        "train.batch_size=2", "train.eval_every=0", "task.eval_tokens=16"), run).fit()
    shutil.rmtree(ranks.parent)  # the ranks file moved away after training
    empty_cache = tmp_path / "empty-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty_cache))
    status, _, err = run_sample(capsys, str(run), "--prompt", "SOCRATES:", "--max-new-tokens", "3")
    assert status == 2 and err.count("\n") == 1 and "which is gone" in err and "--tokenizer-file" in err

    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    shutil.copy(GPT2_RANKS, cache / R50K_CACHE_KEY)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    status, out, err = run_sample(capsys, str(run), "--prompt", "SOCRATES:", "--max-new-tokens", "3")
    assert status == 0, err
    assert out.startswith("SOCRATES:")


def test_a_prompt_longer_than_the_model_reads_is_a_one_line_error(tmp_path, capsys):
    trainer = Trainer(make_config("train.steps=1", "train.eval_every=0", "task.n_eval=10", "model.n_layer=1",
                                  "model.n_embd=32"), tmp_path)
    trainer.fit()
    context = trainer.task.max_seq_len  # the window it trained on
    assert context < trainer.cfg.model.max_seq_len  # (so that the test tells the two apart)
    prompt = " ".join(["3"] * (context + 1))
    status, out, err = run_sample(capsys, str(tmp_path), "--prompt", prompt, "--temperature", "0")
    assert status == 2 and out == ""
    assert err.startswith("error: the prompt is") and f"at most {context}" in err and err.count("\n") == 1


def test_sampling_a_run_without_checkpoints_names_the_argument(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    status, _, err = run_sample(capsys, str(tmp_path / "run"))
    assert status == 2 and err.count("\n") == 1
    assert "resume=" not in err and "no checkpoint" in err
