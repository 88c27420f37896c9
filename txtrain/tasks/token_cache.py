"""The corpus tokenized once, kept as a flat file of token ids and memory-mapped from then on.

A cache entry is keyed by the corpus's content and the tokenizer, so an edited corpus or
another tokenizer makes a new entry and an unchanged one is reused. ``<key>.bin`` holds the
ids (uint16 where the vocabulary fits, else uint32); ``<key>.json``, written last, says how
many and how to rebuild the tokenizer. Both are published by renaming, so a reader never
sees half an entry. Under torchrun, one process per node tokenizes while the others wait.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from tqdm import tqdm

from txtrain.config import ConfigError, TextTaskConfig
from txtrain.tasks.corpus import Corpus, cache_root
from txtrain.tasks.tokenizers import SIMPLE, Tokenizer, build_tokenizer, from_state

FORMAT = 1  # bump when the layout of an entry changes


def load_tokens(corpus: Corpus, cfg: TextTaskConfig, progress: bool = True) -> tuple[np.ndarray, Tokenizer]:
    """The corpus's token ids (memory-mapped) and the tokenizer that made them."""
    # Every process builds the tokenizer: a bad name or ranks file fails everywhere alike.
    tokenizer = None if cfg.tokenizer in SIMPLE else build_tokenizer(cfg.tokenizer, cfg.tokenizer_file)
    fingerprint = tokenizer.fingerprint() if tokenizer is not None else cfg.tokenizer
    key = hashlib.sha256(f"{FORMAT}|{fingerprint}|{corpus.fingerprint()}".encode()).hexdigest()[:24]
    entry = cache_root(cfg.cache_dir) / "tokens" / key
    failure = None
    if is_local_leader() and not entry.with_suffix(".json").is_file():
        try:
            build_entry(entry, corpus, cfg, tokenizer, progress)
        except ConfigError as error:  # say it after the others stopped waiting
            failure = error
    if dist.is_initialized():
        dist.barrier()
    if failure is not None:
        raise failure
    if not entry.with_suffix(".json").is_file():
        raise ConfigError(f"the token cache {entry}.json is missing after tokenizing (did the process "
                          "that tokenizes fail? is task.cache_dir on a disk every node shares?)")
    meta = json.loads(entry.with_suffix(".json").read_text())
    tokens = np.memmap(entry.with_suffix(".bin"), dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
    return tokens, tokenizer or from_state(meta["tokenizer"])


def is_local_leader() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def build_entry(entry: Path, corpus: Corpus, cfg: TextTaskConfig, tokenizer: Tokenizer | None,
                progress: bool) -> None:
    texts = [corpus.read(file) for file in corpus.files]
    if not any(text.strip() for text in texts):
        raise ConfigError(f"the corpus at {corpus.root} is empty (only white space)")
    if tokenizer is None:
        separator = "\n\n" if len(texts) > 1 else ""
        tokenizer = build_tokenizer(cfg.tokenizer, corpus_text="".join(texts) + separator)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    entry.parent.mkdir(parents=True, exist_ok=True)
    unique = f"{socket.gethostname()}.{os.getpid()}"  # nodes sharing the cache never collide
    partial = entry.with_name(f".{entry.name}.{unique}.bin")
    n_tokens = 0
    bar = tqdm(total=corpus.n_bytes, unit="B", unit_scale=True, desc=f"tokenizing ({tokenizer.name})",
               disable=not (progress and sys.stderr.isatty()), leave=False)
    with partial.open("wb") as out:
        for file, text in zip(corpus.files, texts):
            ids = tokenizer.encode(text)
            if tokenizer.end_of_text is not None:  # documents stay apart
                ids.append(tokenizer.end_of_text)
            elif len(corpus.files) > 1 and not text.endswith("\n\n"):
                ids += tokenizer.encode("\n\n")
            np.asarray(ids, dtype=dtype).tofile(out)
            n_tokens += len(ids)
            bar.update(file.stat().st_size)
    bar.close()
    os.replace(partial, entry.with_suffix(".bin"))
    meta = {"format": FORMAT, "tokens": n_tokens, "dtype": np.dtype(dtype).name,
            "tokenizer": tokenizer.state(), "files": [str(f) for f in corpus.files],
            "bytes": corpus.n_bytes}
    partial_meta = entry.with_name(f".{entry.name}.{unique}.json")
    partial_meta.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(partial_meta, entry.with_suffix(".json"))
