"""txtrain-prepare: text in the formats people keep, tokenized into shards, in parallel, resumable."""

import gzip
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED
from txtrain import prepare
from txtrain.config import ConfigError
from txtrain.tasks.documents import find_sources
from txtrain.tasks.prepared import DATASET_FILE, JOURNAL_FILE
from txtrain.tasks.shards import TokenStream, read_shard_header
from txtrain.tasks.tokenizers import build_tokenizer

GPT2_RANKS = SHARED / "tiktoken" / "gpt2.tiktoken"
DOCUMENTS = [f"Dialogue {i}: SOCRATES asks what {'virtue' if i % 2 else 'justice'} is. " * (3 + i % 5)
             for i in range(40)]


def run_prepare(*args) -> tuple[int, str]:
    """``txtrain-prepare *args`` in this process: (exit status, stderr)."""
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            prepare.main([*map(str, args), "--no-progress"])
            status = 0
        except SystemExit as leaving:
            status = leaving.code
    return status, err.getvalue()


def write_inputs(folder: Path, documents=DOCUMENTS) -> dict[str, Path]:
    """The same documents as .txt files, as .jsonl, as .jsonl.gz and (with pyarrow) as .parquet."""
    folder.mkdir(parents=True, exist_ok=True)
    made = {"txt": folder / "txt"}
    made["txt"].mkdir()
    for i, text in enumerate(documents):
        (made["txt"] / f"{i:03d}.txt").write_text(text)
    lines = "".join(json.dumps({"id": i, "text": text}) + "\n" for i, text in enumerate(documents))
    made["jsonl"] = folder / "docs.jsonl"
    made["jsonl"].write_text(lines)
    made["jsonl.gz"] = folder / "docs.jsonl.gz"
    made["jsonl.gz"].write_bytes(gzip.compress(lines.encode()))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        made["parquet"] = folder / "docs.parquet"
        pq.write_table(pa.table({"id": list(range(len(documents))), "text": documents}), made["parquet"],
                       row_group_size=7)
    except ImportError:
        pass
    return made


def stream(folder: Path, split: str = "train") -> np.ndarray:
    description = json.loads((folder / DATASET_FILE).read_text())
    tokens = TokenStream([read_shard_header(folder / s["name"]) for s in description["shards"][split]])
    return tokens.read(0, len(tokens))


def test_every_input_format_gives_the_documents_each_ended_by_end_of_text(tmp_path):
    if not GPT2_RANKS.is_file():
        pytest.skip(f"GPT-2 ranks not found at {GPT2_RANKS}")
    tokenizer = build_tokenizer("gpt2", str(GPT2_RANKS))
    inputs = write_inputs(tmp_path / "in")
    expected = np.concatenate([tokenizer.encode(text) + [tokenizer.end_of_text] for text in DOCUMENTS])
    for kind, path in inputs.items():
        out = tmp_path / kind
        status, err = run_prepare(path, "--out", out, "--tokenizer-file", GPT2_RANKS, "--workers", 1,
                                  "--shard-tokens", 300, "--val-fraction", 0.1)
        assert status == 0, err
        train, val = stream(out, "train"), stream(out, "val")
        assert np.array_equal(np.concatenate([train, val]), expected), kind
        assert len(val) == int(len(expected) * 0.1)
        description = json.loads((out / DATASET_FILE).read_text())
        assert description["tokens"] == {"train": len(train), "val": len(val)}
        assert all(s["tokens"] == 300 for s in description["shards"]["train"][:-1])
        assert description["tokenizer"]["name"] == "gpt2" and description["max_id"] == expected.max()
    assert "parquet" in inputs or pytest.importorskip("pyarrow")


def test_the_output_is_the_same_bytes_for_any_number_of_workers(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    for workers in (1, 2):
        status, err = run_prepare(inputs["jsonl"], inputs["txt"], "--out", tmp_path / f"w{workers}",
                                  "--tokenizer", "bytes", "--workers", workers, "--shard-tokens", 2000)
        assert status == 0, err
    one, two = sorted((tmp_path / "w1").iterdir()), sorted((tmp_path / "w2").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) > 4
    for a, b in zip(one, two):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_a_prepare_killed_midway_resumes_after_its_last_shard_and_ends_the_same(tmp_path):
    """Real kill -9 of a running txtrain-prepare; the rerun keeps its finished shards and
    makes the same dataset as one that was never stopped."""
    documents = [f"document {i} " + "abcdefgh" * (200 + i % 50) for i in range(3000)]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
    args = [inputs, "--tokenizer", "bytes", "--workers", "1", "--shard-tokens", "20000", "--no-progress"]
    run_prepare(*args, "--out", tmp_path / "whole")

    out = tmp_path / "stopped"
    command = [sys.executable, "-m", "txtrain.prepare", *map(str, args), "--out", str(out)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    journal = out / JOURNAL_FILE
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if journal.is_file() and len(json.loads(journal.read_text())["train"]) >= 3:
            break
        time.sleep(0.005)
    assert process.poll() is None, "the prepare ended before it could be stopped"
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = json.loads(journal.read_text())["train"]
    assert not (out / DATASET_FILE).exists(), "a stopped prepare must not look finished"
    kept = {shard["name"]: (out / shard["name"]).stat().st_ino for shard in finished}

    status, err = run_prepare(*args, "--out", out)
    assert status == 0, err
    assert {name: (out / name).stat().st_ino for name in kept} == kept, "finished shards were redone"
    assert not journal.exists()
    for a, b in zip(sorted((tmp_path / "whole").iterdir()), sorted(out.iterdir()), strict=True):
        assert a.name == b.name and a.read_bytes() == b.read_bytes(), a.name


def test_a_prepare_stopped_while_finishing_completes_on_the_rerun(tmp_path, monkeypatch):
    """A stop between writing the validation shard and cutting the training shards."""
    from txtrain.tasks import prepared

    inputs = write_inputs(tmp_path / "in")
    args = [inputs["jsonl"], "--tokenizer", "bytes", "--workers", 1, "--shard-tokens", 1000,
            "--val-fraction", 0.25]
    assert run_prepare(*args, "--out", tmp_path / "whole")[0] == 0
    real = prepared.keep_first_tokens
    monkeypatch.setattr(prepared, "keep_first_tokens", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert run_prepare(*args, "--out", tmp_path / "stopped")[0] == 130
    monkeypatch.setattr(prepared, "keep_first_tokens", real)
    assert run_prepare(*args, "--out", tmp_path / "stopped")[0] == 0
    for a, b in zip(sorted((tmp_path / "whole").iterdir()), sorted((tmp_path / "stopped").iterdir()), strict=True):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_a_finished_dataset_is_left_as_it_is_and_another_is_refused(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    args = [inputs["txt"], "--out", tmp_path / "out", "--tokenizer", "bytes", "--workers", 1]
    assert run_prepare(*args)[0] == 0
    written = (tmp_path / "out" / DATASET_FILE).stat().st_mtime_ns
    assert run_prepare(*args)[0] == 0
    assert (tmp_path / "out" / DATASET_FILE).stat().st_mtime_ns == written
    status, err = run_prepare(inputs["jsonl"], "--out", tmp_path / "out", "--tokenizer", "bytes")
    assert status == 2 and "holds another dataset" in err and err.count("\n") == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    status, err = run_prepare(inputs["txt"], "--out", tmp_path / "busy", "--tokenizer", "bytes")
    assert status == 2 and "not empty" in err
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("content,message", [
    ({"empty.jsonl": ""}, "holds no text"),
    ({"blank.txt": " \n\n "}, "holds no text"),
    ({"docs.jsonl": '{"text": "fine"}\n{"body": "no text field"}\n'}, "line 2 has no field 'text'"),
    ({"docs.jsonl": '{"text": "fine"}\nnot json\n'}, "line 2: not a JSON object"),
    ({"docs.jsonl.gz": "this is not gzip"}, "docs.jsonl.gz"),
    ({"notes.md": "# not a known kind"}, "without .txt"),
    ({}, "no such file"),
])
def test_bad_input_is_one_error_line_and_leaves_nothing_that_looks_finished(tmp_path, content, message):
    (tmp_path / "in").mkdir()
    for name, text in content.items():
        (tmp_path / "in" / name).write_bytes(text.encode())
    target = tmp_path / "in" if content else tmp_path / "absent"
    status, err = run_prepare(target, "--out", tmp_path / "out", "--tokenizer", "bytes", "--workers", 1)
    assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err
    assert not (tmp_path / "out" / DATASET_FILE).exists()


def test_a_parquet_file_without_the_text_column_is_named_in_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "docs.parquet")
    status, err = run_prepare(tmp_path / "docs.parquet", "--out", tmp_path / "out", "--tokenizer", "bytes")
    assert status == 2 and "no column 'text' (it has: body)" in err


def test_a_missing_hugging_face_dataset_or_library_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    status, err = run_prepare("hf:nobody/no-such-dataset", "--out", tmp_path / "out", "--tokenizer", "bytes")
    assert status == 2 and err.count("\n") == 1
    assert "Hugging Face" in err
    assert not (tmp_path / "out").exists()


def test_char_vocabulary_covers_every_input_and_round_trips(tmp_path):
    inputs = write_inputs(tmp_path / "in")
    status, err = run_prepare(inputs["jsonl.gz"], "--out", tmp_path / "out", "--tokenizer", "char",
                              "--val-fraction", 0)
    assert status == 0, err
    description = json.loads((tmp_path / "out" / DATASET_FILE).read_text())
    symbols = description["tokenizer"]["symbols"]
    assert "".join(symbols[i] for i in stream(tmp_path / "out")) == "\n\n".join(DOCUMENTS) + "\n\n"


def test_sources_are_every_known_file_of_a_folder_in_name_order(tmp_path):
    for name in ["b/2.txt", "a.jsonl", "c.parquet", "skip.md", "b/1.jsonl.gz"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    names = [Path(s.name).relative_to(tmp_path).as_posix() for s in find_sources([str(tmp_path)])]
    assert names == ["a.jsonl", "b/1.jsonl.gz", "b/2.txt", "c.parquet"]
    with pytest.raises(ConfigError, match="reads .txt"):
        find_sources([str(tmp_path / "skip.md")])


def test_a_full_disk_is_one_line_and_the_rerun_finishes_where_there_is_room(tmp_path):
    """A real small filesystem (tmpfs, as root): the prepare stops in one line, keeps its
    finished shards, and the same command finishes once there is room."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        documents = [f"document {i} " + "abcdefgh" * 300 for i in range(200)]  # about 500 kB of tokens
        inputs = tmp_path / "in.jsonl"
        inputs.write_text("".join(json.dumps({"text": t}) + "\n" for t in documents))
        args = [inputs, "--out", disk / "out", "--tokenizer", "bytes", "--workers", 1, "--shard-tokens", 8000]
        status, err = run_prepare(*args)
        assert status == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert "No space left" in err and "run the same command again" in err
        assert not (disk / "out" / DATASET_FILE).exists()
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        status, err = run_prepare(*args)
        assert status == 0, err
        assert run_prepare(inputs, "--out", tmp_path / "whole", "--tokenizer", "bytes", "--workers", 1,
                           "--shard-tokens", 8000)[0] == 0
        for a, b in zip(sorted((tmp_path / "whole").iterdir()), sorted((disk / "out").iterdir()), strict=True):
            assert a.name == b.name and a.read_bytes() == b.read_bytes(), a.name
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], capture_output=True)  # even while a file is open
