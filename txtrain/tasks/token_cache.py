"""A text corpus tokenized once into the token cache, and read from there as prepared data.

A cache entry is a folder that ``txtrain-prepare``'s writer fills (``prepared.py``: shards and
``dataset.json``), keyed by the corpus's content and the tokenizer, so an edited corpus or
another tokenizer makes a new entry and an unchanged one is reused. It holds no validation
shards: the text task holds out the end of the corpus itself (``task.val_fraction``). An entry
is written in a folder of its own and published by renaming it, so a reader never sees half
of one. Under torchrun, one process per node tokenizes while the others wait.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import torch.distributed as dist

from txtrain.config import ConfigError, TextTaskConfig
from txtrain.tasks.corpus import Corpus, cache_root
from txtrain.tasks.documents import Source, read_text_file
from txtrain.tasks.prepared import DATASET_FILE, EmptyInput, prepare_dataset
from txtrain.tasks.tokenizers import SIMPLE, Tokenizer, build_tokenizer

FORMAT = 2  # bump when the layout of an entry changes


def cached_tokens(corpus: Corpus, cfg: TextTaskConfig, progress: bool = True) -> Path:
    """The folder of the corpus's tokens in the cache, prepared first if it is not there."""
    # Every process builds the tokenizer: a bad name or ranks file fails everywhere alike.
    tokenizer = None if cfg.tokenizer in SIMPLE else build_tokenizer(cfg.tokenizer, cfg.tokenizer_file)
    fingerprint = tokenizer.fingerprint() if tokenizer is not None else cfg.tokenizer
    key = hashlib.sha256(f"{FORMAT}|{fingerprint}|{corpus.fingerprint()}".encode()).hexdigest()[:24]
    entry = cache_root(cfg.cache_dir) / "tokens" / key
    failure = None
    if is_local_leader() and not (entry / DATASET_FILE).is_file():
        try:
            build_entry(entry, corpus, cfg, tokenizer, progress)
        except (ConfigError, OSError) as error:  # say it after the others stopped waiting
            failure = error  # (on the others: the cache is missing, below)
    if dist.is_initialized():
        dist.barrier()
    if failure is not None:
        raise failure
    if not (entry / DATASET_FILE).is_file():
        raise ConfigError(f"the token cache {entry} is missing after tokenizing (did the process "
                          "that tokenizes fail? is task.cache_dir on a disk every node shares?)")
    return entry


def is_local_leader() -> bool:
    return int(os.environ.get("LOCAL_RANK", 0)) == 0


def build_entry(entry: Path, corpus: Corpus, cfg: TextTaskConfig, tokenizer: Tokenizer | None,
                progress: bool) -> None:
    if tokenizer is None:
        texts = [read_text_file(file) for file in corpus.files]
        if not any(text.strip() for text in texts):
            raise ConfigError(f"the corpus at {corpus.root} is empty (only white space)")
        separator = "\n\n" if len(texts) > 1 else ""
        tokenizer = build_tokenizer(cfg.tokenizer, corpus_text="".join(texts) + separator)
    entry.parent.mkdir(parents=True, exist_ok=True)
    unique = entry.with_name(f".{entry.name}.{socket.gethostname()}.{os.getpid()}")  # nodes never collide
    try:
        prepare_dataset([Source(str(file), file.stat().st_size) for file in corpus.files], unique,
                        tokenizer, progress=progress)
        try:
            unique.rename(entry)
        except OSError:  # another node published the same entry first
            if not (entry / DATASET_FILE).is_file():
                raise
    except EmptyInput:
        raise ConfigError(f"the corpus at {corpus.root} is empty (only white space)") from None
    finally:
        shutil.rmtree(unique, ignore_errors=True)
