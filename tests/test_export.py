"""txtrain-export: a checkpoint of any layout as a transformers GPT-2 folder (the same logits)
or as txtrain's own safetensors file; and loading a checkpoint from elsewhere runs no code."""

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SHARED, call_txtrain, make_config, run_ranks
from txtrain.checkpoint import (LoadFailed, UnsafeCheckpoint, load_state, load_state_keys,
                                read_metadata, verify, write_manifest)
from txtrain.config import ModelConfig
from txtrain.export import gpt2_mismatches, main as export
from txtrain.model import Transformer
from txtrain.sample import load_model, main as sample
from txtrain.train import Trainer

pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

GPT2_RANKS = SHARED / "tiktoken" / "gpt2.tiktoken"
TINY = ["train.eval_every=0", "model.n_layer=2", "model.n_embd=32", "model.n_head=4", "precision=fp32"]


def run(main, capsys, *args: str) -> tuple[int, str, str]:
    status = 0
    try:
        main(list(args))
    except SystemExit as leaving:
        status = leaving.code
    out, err = capsys.readouterr()
    return status, out, err


def logits_of_both(run_dir: Path, exported: Path, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    model = load_model(run_dir, torch.device("cpu"))[0]
    hf = transformers.GPT2LMHeadModel.from_pretrained(exported).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])), hf(torch.tensor([ids])).logits


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A GPT on GPT-2's tokenizer, its head tied, trained for 2 steps."""
    if not GPT2_RANKS.is_file():
        pytest.skip(f"the GPT-2 ranks are not at {GPT2_RANKS}")
    where = tmp_path_factory.mktemp("text")
    corpus = where / "corpus.txt"
    corpus.write_text("SOCRATES: What is justice? MENO: I do not know, Socrates.\n" * 40)
    Trainer(make_config("task=text", f"task.data.path={corpus}", f"task.tokenizer_file={GPT2_RANKS}",
                        f"task.cache_dir={where / 'cache'}", "task.seq_len=16", "task.prompts=[]",
                        "model.max_seq_len=32", "train.steps=2", "train.batch_size=2",
                        "task.eval_tokens=16", *TINY), where / "run").fit()
    return where / "run"


def test_a_gpt2_checkpoint_loads_in_transformers_with_the_same_logits_and_tokens(text_run, tmp_path, capsys):
    out = tmp_path / "hf"
    status, _, err = run(export, capsys, str(text_run), "--out", str(out))
    assert status == 0, err
    assert {p.name for p in out.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
        "tokenizer_config.json", "special_tokens_map.json"}
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 50257 and config["activation_function"] == "gelu"  # unpadded; exact GELU
    assert config["tie_word_embeddings"] is True

    prompt = "SOCRATES: What is justice, Meno?"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    from txtrain.tasks.tokenizers import TiktokenTokenizer

    ids = TiktokenTokenizer("gpt2", str(GPT2_RANKS)).encode(prompt)
    assert tokenizer(prompt)["input_ids"] == ids
    ours, theirs = logits_of_both(text_run, out, ids)
    assert ours.shape == theirs.shape == (1, len(ids), 50257)
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The reverse task under fsdp x2, its head untied, 15 rows split unevenly over the ranks."""
    where = tmp_path_factory.mktemp("fsdp")
    result = run_ranks("parallel=fsdp", "train.steps=2", "task.n_eval=10", "model.tie_embeddings=false",
                       "model.vocab_multiple=5", "progress=false", *TINY,
                       f"hydra.run.dir={where / 'run'}", cwd=where)
    assert result.returncode == 0, result.stderr[-3000:]
    return where / "run"


def test_an_fsdp_checkpoint_exports_in_one_process_both_ways(fsdp_run, tmp_path, capsys):
    out = tmp_path / "hf"
    status, _, err = run(export, capsys, str(fsdp_run), "--out", str(out))
    assert status == 0, err
    assert not torch.distributed.is_initialized()
    assert "no tokenizer files" in err  # the reverse task's symbols
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ours, theirs = logits_of_both(fsdp_run, out, [3, 4, 5, 6, 1, 2])
    assert ours.shape == theirs.shape == (1, 6, 13)
    assert (ours - theirs).abs().max().item() < 1e-5

    sharded = tmp_path / "sharded"
    status, _, err = run(export, capsys, str(fsdp_run), "--out", str(sharded), "--max-shard-size", "10KB")
    assert status == 0, err
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 2 and all((sharded / name).is_file() for name in files)
    assert not (sharded / "model.safetensors").exists() and "lm_head.weight" in index["weight_map"]
    assert torch.equal(logits_of_both(fsdp_run, sharded, [3, 4, 5, 6, 1, 2])[1], theirs)

    from safetensors import safe_open

    own = tmp_path / "own"
    status, _, err = run(export, capsys, str(fsdp_run), "--out", str(own), "--format", "safetensors")
    assert status == 0, err
    model = load_model(fsdp_run, torch.device("cpu"))[0]
    with safe_open(str(own / "model.safetensors"), "pt") as weights:
        meta = weights.metadata()
        state = {name: weights.get_tensor(name) for name in weights.keys()}
    rebuilt = Transformer(ModelConfig(**json.loads(meta["txtrain.model_config"])), int(meta["txtrain.vocab_size"]))
    rebuilt.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(rebuilt.state_dict().values(), model.state_dict().values()))


@pytest.fixture(scope="module")
def rope_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rope") / "run"
    Trainer(make_config("train.steps=1", "train.eval_every=0", "task.n_eval=10", "model.n_layer=1",
                        "model.n_embd=16", "model.pos=rope"), run_dir).fit()
    return run_dir


def test_an_architecture_gpt2_cannot_express_is_one_error_line_and_safetensors_takes_it(rope_run, tmp_path, capsys):
    status, out, err = run(export, capsys, str(rope_run), "--out", str(tmp_path / "hf"))
    assert status == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("error: ") and "model.pos=rope" in err and "--format safetensors" in err
    assert not (tmp_path / "hf").exists()
    post = ModelConfig(norm="post", activation="relu", bias=False, pos="sinusoidal")
    assert [line.split(" (")[0] for line in gpt2_mismatches(post)] == [
        "model.pos=sinusoidal", "model.norm=post", "model.activation=relu", "model.bias=false"]
    assert gpt2_mismatches(ModelConfig(arch="encoder"))[0].startswith("model.arch=encoder")

    status, _, err = run(export, capsys, str(rope_run), "--out", str(tmp_path / "own"), "--format", "safetensors")
    assert status == 0, err
    from safetensors.torch import load_file

    model = load_model(rope_run, torch.device("cpu"))[0]
    state = load_file(str(tmp_path / "own" / "model.safetensors"))
    assert "head.weight" not in state  # tied: kept once, as token_embedding.weight
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items()
               if name != "head.weight")


class RunsCode:
    """Unpickled, it runs code: it creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_checkpoint_whose_metadata_would_run_code_is_refused_unrun(rope_run, tmp_path, capsys):
    folder = tmp_path / "downloaded"
    shutil.copytree(sorted((rope_run / "checkpoints").glob("step_*"))[-1], folder)
    marker = tmp_path / "pwned"
    metadata = read_metadata(folder / "state")
    metadata.planner_data = RunsCode(marker)  # deep inside otherwise genuine metadata
    crafted = pickle.dumps(metadata)
    (folder / "state" / ".metadata").write_bytes(crafted)
    write_manifest(folder, step=1)  # whoever crafted it can write a manifest that matches

    for main in (sample, export):
        args = [str(folder), "--out", str(tmp_path / "out")] if main is export else [str(folder)]
        status, out, err = run(main, capsys, *args)
        assert status == 2 and out == "" and err.count("\n") == 1, err
        assert err.startswith("error: refusing checkpoint") and "builtins.exec" in err
        assert "safetensors" in err and not marker.exists()
    resumed = call_txtrain(f"resume={folder}", f"hydra.run.dir={tmp_path / 'run'}", "model.n_layer=1",
                           "model.n_embd=16", "model.pos=rope", "train.steps=2")
    assert resumed.status != 0 and "refusing checkpoint" in resumed.stderr and not marker.exists()
    with pytest.raises(LoadFailed, match="builtins.exec"):  # the reader itself, past the manifest
        load_state(folder, {"model": Transformer(make_config("model.n_layer=1", "model.n_embd=16",
                                                             "model.pos=rope").model, 13).state_dict()})
    with pytest.raises(LoadFailed, match="builtins.exec"):
        load_state_keys(folder)
    assert not marker.exists()

    pickle.loads(crafted)  # what torch's own reader would have done
    assert marker.exists()


class RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_metadata_naming_any_other_callable_or_a_file_outside_the_checkpoint_is_refused(rope_run, tmp_path):
    original = sorted((rope_run / "checkpoints").glob("step_*"))[-1]
    genuine = read_metadata(original / "state")
    outside = pickle.loads(pickle.dumps(genuine))
    next(iter(outside.storage_data.values())).relative_path = "../../meta.pt"
    marker = tmp_path / "pwned"
    for name, content, says in [("system", RunsCommand(marker), r"refers to (posix|nt)\.system"),
                                ("outside", outside, "outside state/")]:
        folder = tmp_path / name
        shutil.copytree(original, folder)
        (folder / "state" / ".metadata").write_bytes(pickle.dumps(content))
        write_manifest(folder, step=1)
        with pytest.raises(UnsafeCheckpoint, match=says):
            verify(folder)
    assert not marker.exists()
