"""A prepared dataset: text tokenized once into shards, then read by any number of runs.

``prepare_dataset`` reads documents in a fixed order, tokenizes them (in ``workers``
processes, results kept in order), ends each with the tokenizer's end-of-text token, and cuts
the token stream into shards of ``shard_tokens`` (``shards.py``). The last ``val_fraction`` of
the stream becomes the validation shards, as the text task holds out the end of a corpus. The
output is the same, byte for byte, whatever the number of workers.

A folder being written holds ``.prepare.json``, a journal of the finished shards and where in
the input each one ends; a prepare that was stopped picks up after the last finished shard.
``dataset.json``, written last, says the folder is whole: its tokenizer, token counts, each
shard's sha256 and the sources. A folder with a journal and no ``dataset.json`` is not read.
"""

from __future__ import annotations

import collections
import json
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from txtrain.config import ConfigError
from txtrain.digest import file_sha256
from txtrain.tasks.documents import Source, documents
from txtrain.tasks.shards import TokenStream, read_shard_header, token_dtype, write_shard
from txtrain.tasks.tokenizers import Tokenizer, from_state

DATASET_FILE = "dataset.json"
JOURNAL_FILE = ".prepare.json"
FORMAT = "txtrain-tokens/1"
SHARD_PREFIX = "tokens"
DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's shard size: 200 MB of uint16
BATCH_CHARS = 1 << 20  # documents are handed to the workers about 1 MB of text at a time


class EmptyInput(ConfigError):
    """The input holds no text at all."""


def shard_name(split: str, index: int) -> str:
    return f"{SHARD_PREFIX}_{split}_{index:06d}.bin"


@dataclass(frozen=True)
class Settings:
    """What determines a prepared dataset's content: a rerun with the same settings resumes or
    finds it done, one with other settings is refused."""

    sources: list[dict]
    tokenizer: dict
    text_field: str
    shard_tokens: int
    val_fraction: float


def prepare_dataset(sources: list[Source], out: Path, tokenizer: Tokenizer, *, workers: int = 1,
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, val_fraction: float = 0.0,
                    text_field: str = "text", progress: bool = True) -> dict:
    """Tokenize ``sources`` into shards under ``out``; the dataset's description (what
    ``dataset.json`` holds)."""
    settings = Settings([{"name": s.name, "bytes": s.n_bytes} for s in sources], tokenizer.state(),
                        text_field, shard_tokens, val_fraction)
    journal = open_journal(out, settings)
    if journal.get("done"):
        return journal["done"]
    if "final" not in journal:
        try:
            write_train_shards(sources, out, tokenizer, journal, workers, progress)
        except ConfigError:
            if not journal["train"]:  # nothing worth resuming: leave no trace
                (out / JOURNAL_FILE).unlink(missing_ok=True)
                if not any(out.iterdir()):
                    out.rmdir()
            raise
    return finish(out, journal, tokenizer)


def open_journal(out: Path, settings: Settings) -> dict:
    """The journal of an unfinished prepare with these settings, a fresh one, or (when the
    folder holds this very dataset already) ``{"done": description}``."""
    wanted = asdict(settings)
    if (out / DATASET_FILE).is_file():
        description = json.loads((out / DATASET_FILE).read_text())
        if description.get("settings") != wanted:
            raise ConfigError(f"{out} holds another dataset (its {DATASET_FILE} has other sources or "
                              "settings): choose an empty folder for --out")
        return {"done": description}
    if (out / JOURNAL_FILE).is_file():
        journal = json.loads((out / JOURNAL_FILE).read_text())
        if journal.get("settings") != wanted:
            raise ConfigError(f"{out} holds an unfinished prepare of other sources or settings: choose "
                              "another folder for --out, or delete this one")
        for partial in out.glob("*.partial"):  # files a stopped prepare was writing
            partial.unlink()
        return journal
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty and holds no dataset txtrain prepared: choose an empty "
                          "or new folder for --out")
    out.mkdir(parents=True, exist_ok=True)
    journal = {"settings": wanted, "train": []}
    save_journal(out, journal)
    return journal


def save_journal(out: Path, journal: dict) -> None:
    partial = out / f"{JOURNAL_FILE}.{os.getpid()}.partial"
    partial.write_text(json.dumps(journal, indent=1) + "\n")
    os.replace(partial, out / JOURNAL_FILE)


class ShardWriter:
    """Cuts a stream of documents' tokens into shards, recording after each where the next
    shard's first token is: (document number, tokens of that document already written)."""

    def __init__(self, out: Path, journal: dict, dtype: np.dtype, shard_tokens: int):
        self.out, self.journal, self.dtype, self.size = out, journal, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.n_pending = 0

    def add(self, document: int, ids: np.ndarray, first: int = 0) -> None:
        """The ids of ``document`` from its token ``first`` on (after a resume, not 0)."""
        self.pending.append(ids)
        self.n_pending += len(ids)
        while self.n_pending >= self.size:
            self.write(document, first + len(ids) - (self.n_pending - self.size))

    def write(self, document: int, written_of_document: int) -> None:
        tokens = np.concatenate(self.pending) if self.pending else np.empty(0, self.dtype)
        shard, rest = tokens[:self.size], tokens[self.size:]
        name = shard_name("train", len(self.journal["train"]))
        sha = write_shard(self.out / name, shard.astype(self.dtype))
        self.journal["train"].append({"name": name, "tokens": len(shard), "sha256": sha,
                                      "max_id": int(shard.max(initial=-1)),
                                      "next": [document, written_of_document]})
        save_journal(self.out, self.journal)
        self.pending, self.n_pending = ([rest] if len(rest) else []), len(rest)

    def close(self, documents_read: int) -> None:
        if self.n_pending:
            self.write(documents_read, 0)


def write_train_shards(sources: list[Source], out: Path, tokenizer: Tokenizer, journal: dict,
                       workers: int, progress: bool) -> None:
    settings = journal["settings"]
    writer = ShardWriter(out, journal, token_dtype(tokenizer.vocab_size), settings["shard_tokens"])
    resume_at, skip = journal["train"][-1]["next"] if journal["train"] else (0, 0)
    total = sum(s.n_bytes for s in sources) if all(s.n_bytes is not None for s in sources) else None
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing ({tokenizer.name})",
               disable=not (progress and sys.stderr.isatty()))
    batches = document_batches(sources, settings["text_field"], resume_at, bar)
    separate = len(sources) > 1 or not sources[0].name.endswith(".txt")
    n_documents, any_text = resume_at, bool(journal["train"])
    with Tokenizing(tokenizer, workers) as encode:
        for first, texts, encoded in encode(batches):
            for number, (text, ids) in enumerate(zip(texts, encoded), first):
                any_text = any_text or bool(text.strip())
                ids = with_separator(ids, text, tokenizer, separate)
                first_token = skip if number == resume_at else 0
                writer.add(number, ids[first_token:], first_token)
                n_documents = number + 1
    bar.close()
    if not any_text:
        raise EmptyInput(f"the input ({', '.join(s.name for s in sources[:3])}"
                          f"{', ...' if len(sources) > 3 else ''}) holds no text")
    writer.close(n_documents)
    journal["documents"] = n_documents
    save_journal(out, journal)


def with_separator(ids: np.ndarray, text: str, tokenizer: Tokenizer, separate: bool) -> np.ndarray:
    """A document's ids and what ends it: the end-of-text token, or (for tokenizers without
    one, between several documents) a blank line."""
    if tokenizer.end_of_text is not None:
        return np.append(ids, tokenizer.end_of_text)
    if separate and not text.endswith("\n\n"):
        return np.append(ids, tokenizer.encode("\n\n"))
    return ids


def document_batches(sources: list[Source], field: str, first: int, bar: tqdm) -> Iterator[tuple[int, list[str]]]:
    """(number of the first document, texts) in batches of about BATCH_CHARS, from document
    ``first`` on (the ones before are read, to find their end, but not tokenized)."""
    number, batch, chars = 0, [], 0
    for source in sources:
        for text, n_bytes in documents(source, field):
            bar.update(n_bytes)
            if number >= first:
                batch.append(text)
                chars += len(text)
                if chars >= BATCH_CHARS:
                    yield number - len(batch) + 1, batch
                    batch, chars = [], 0
            number += 1
    if batch:
        yield number - len(batch), batch


class Tokenizing:
    """``encode(batches)`` yields (first, texts, ids of each text) in the batches' order,
    tokenized here or by a pool of worker processes."""

    def __init__(self, tokenizer: Tokenizer, workers: int):
        self.tokenizer, self.workers, self.pool = tokenizer, workers, None

    def __enter__(self):
        if self.workers > 1:
            # spawn: a fresh interpreter per worker, safe whatever threads this process runs
            context = multiprocessing.get_context("spawn")
            self.pool = context.Pool(self.workers, initializer=start_worker, initargs=(self.tokenizer.state(),))
            return self.in_pool
        return self.here

    def __exit__(self, *failure):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()

    def here(self, batches):
        for first, texts in batches:
            yield first, texts, encode_all(self.tokenizer, texts)

    def in_pool(self, batches):
        # A few batches in flight per worker: enough to keep them busy, without reading the
        # whole input into the queue ahead of them (Pool.imap would).
        in_flight = collections.deque()
        for first, texts in batches:
            in_flight.append((first, texts, self.pool.apply_async(encode_in_worker, (texts,))))
            if len(in_flight) > 2 * self.workers:
                first, texts, result = in_flight.popleft()
                yield first, texts, result.get()
        while in_flight:
            first, texts, result = in_flight.popleft()
            yield first, texts, result.get()


def encode_all(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(tokenizer.encode(text), dtype=np.int64) for text in texts]


_worker_tokenizer: Tokenizer | None = None


def start_worker(state: dict) -> None:
    global _worker_tokenizer
    _worker_tokenizer = from_state(state)


def encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return encode_all(_worker_tokenizer, texts)


def finish(out: Path, journal: dict, tokenizer: Tokenizer) -> dict:
    """Hold out the last ``val_fraction`` of the tokens as validation shards, then write
    ``dataset.json``. Each step can be run again, so a stop in the middle resumes here."""
    settings = journal["settings"]
    if "final" not in journal:
        train = journal["train"]
        total = sum(shard["tokens"] for shard in train)
        n_val = int(total * settings["val_fraction"])
        stream = TokenStream([read_shard_header(out / shard["name"]) for shard in train])
        dtype = token_dtype(tokenizer.vocab_size)
        val = []
        for index, first in enumerate(range(total - n_val, total, settings["shard_tokens"])):
            tokens = stream.read(first, min(settings["shard_tokens"], total - first))
            name = shard_name("val", index)
            val.append({"name": name, "tokens": len(tokens), "max_id": int(tokens.max()),
                        "sha256": write_shard(out / name, tokens.astype(dtype))})
        journal["final"] = {"train_tokens": total - n_val, "val": val}
        save_journal(out, journal)
    train = keep_first_tokens(out, journal["train"], journal["final"]["train_tokens"])
    val = journal["final"]["val"]
    description = {
        "format": FORMAT,
        "tokenizer": tokenizer.state(),
        "vocab_size": tokenizer.vocab_size,
        "tokens": {"train": sum(s["tokens"] for s in train), "val": sum(s["tokens"] for s in val)},
        "documents": journal.get("documents"),
        "max_id": max(s["max_id"] for s in train + val),
        "shards": {"train": [strip(s) for s in train], "val": [strip(s) for s in val]},
        "settings": settings,
    }
    partial = out / f"{DATASET_FILE}.{os.getpid()}.partial"
    partial.write_text(json.dumps(description, indent=1) + "\n")
    os.replace(partial, out / DATASET_FILE)
    (out / JOURNAL_FILE).unlink()
    return description


def strip(shard: dict) -> dict:
    return {key: shard[key] for key in ("name", "tokens", "sha256")}


def keep_first_tokens(out: Path, shards: list[dict], n_tokens: int) -> list[dict]:
    """Cut the training shards to their first ``n_tokens`` tokens (the rest became validation):
    the shard across the cut is rewritten shorter, the ones after it removed."""
    kept, start = [], 0
    for shard in shards:
        path = out / shard["name"]
        if start >= n_tokens:
            path.unlink(missing_ok=True)
        elif start + shard["tokens"] > n_tokens:
            keep = n_tokens - start
            current = read_shard_header(path)
            tokens = TokenStream([current]).read(0, keep).astype(current.dtype)
            # Cut it, unless an earlier try did: the tokens kept are the same either way.
            sha = write_shard(path, tokens) if current.n_tokens != keep else file_sha256(path)
            kept.append({**shard, "tokens": keep, "max_id": int(tokens.max()), "sha256": sha})
        else:
            kept.append(shard)
        start += shard["tokens"]
    return kept

