"""The text task's tokens, wherever ``task.data.path`` points.

- a folder ``txtrain-prepare`` wrote (``dataset.json`` and its shards);
- a folder of llm.c / modded-nanogpt shards (``*_train_*.bin``, ``*_val_*.bin``);
- a nanoGPT data folder (``train.bin``, ``val.bin``, and ``meta.pkl`` for a character
  vocabulary; without it, GPT-2's encoding);
- text: a ``.txt`` file or a folder of them, prepared once into the token cache
  (``token_cache.py``) and read from there as a prepared folder.

Nothing is read whole: each is opened as a ``TokenStream`` over its files' headers.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path

from txtrain.config import ConfigError, TextTaskConfig
from txtrain.tasks.prepared import DATASET_FILE, FORMAT, JOURNAL_FILE
from txtrain.tasks.shards import TokenStream, raw_tokens, read_shard_header
from txtrain.tasks.tokenizers import GPT2_NAMES, CharTokenizer, Tokenizer, build_tokenizer, from_state


@dataclass
class TokenData:
    train: TokenStream
    val: TokenStream | None  # None: the task holds out the end of ``train``
    codec: Tokenizer
    what: str  # for the run's description


def is_token_folder(path: Path) -> bool:
    return path.is_dir() and any((
        (path / DATASET_FILE).exists(), (path / JOURNAL_FILE).exists(), (path / "train.bin").exists(),
        next(path.glob("*_train_*.bin"), None) is not None))


def open_token_folder(path: Path, cfg: TextTaskConfig) -> TokenData:
    if (path / DATASET_FILE).is_file():
        return open_prepared(path, cfg)
    if (path / JOURNAL_FILE).exists():
        raise ConfigError(f"{path} is a dataset whose preparation did not finish: run the same "
                          "txtrain-prepare command again to complete it")
    if (path / "train.bin").is_file():
        return open_nanogpt(path, cfg)
    return open_llmc(path, cfg)


def open_prepared(path: Path, cfg: TextTaskConfig) -> TokenData:
    try:
        description = json.loads((path / DATASET_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path / DATASET_FILE} is not valid JSON ({error}): prepare the data again") from None
    if description.get("format") != FORMAT:
        raise ConfigError(f"{path / DATASET_FILE} is not a dataset description txtrain reads "
                          f"(format {description.get('format')!r}, expected {FORMAT!r})")
    codec = matching_tokenizer(description["tokenizer"], cfg, path / DATASET_FILE)

    def stream(split: str) -> TokenStream:
        shards = []
        for listed in description["shards"][split]:
            shard = read_shard_header(path / listed["name"]) if (path / listed["name"]).is_file() else None
            if shard is None:
                raise ConfigError(f"{path / listed['name']} is missing: the dataset is incomplete")
            if shard.n_tokens != listed["tokens"]:
                raise ConfigError(f"{shard.path} holds {shard.n_tokens:,} tokens, {DATASET_FILE} says "
                                  f"{listed['tokens']:,}: the shard was replaced or damaged")
            shards.append(shard)
        return TokenStream(shards)

    if description["max_id"] >= codec.vocab_size:
        raise ConfigError(f"{path} holds token id {description['max_id']}, beyond the vocabulary of "
                          f"{codec.vocab_size:,}")
    val = stream("val")
    n_shards = len(description["shards"]["train"]) + len(description["shards"]["val"])
    return TokenData(stream("train"), val if len(val) else None, codec,
                     f"prepared dataset at {path} ({n_shards} shard(s))")


def matching_tokenizer(state: dict, cfg: TextTaskConfig, where: Path) -> Tokenizer:
    """The tokenizer the data was made with, if it is the run's (a ``ConfigError`` if not)."""
    recorded = state.get("name", state["kind"])
    aliases = GPT2_NAMES if recorded in GPT2_NAMES else (recorded,)
    if cfg.tokenizer not in aliases:
        raise ConfigError(f"{where} was tokenized with {recorded}, and this run says task.tokenizer="
                          f"{cfg.tokenizer}: set task.tokenizer={recorded}, or prepare the data again")
    return from_state(state, cfg.tokenizer_file)


def open_llmc(path: Path, cfg: TextTaskConfig) -> TokenData:
    def stream(split: str) -> TokenStream:
        return TokenStream([read_shard_header(file) for file in sorted(path.glob(f"*_{split}_*.bin"))])

    codec = run_tokenizer(cfg, path)
    val = stream("val")
    return TokenData(stream("train"), val if len(val) else None, codec,
                     f"llm.c shards at {path} ({len(stream('train').shards) + len(val.shards)} file(s))")


def open_nanogpt(path: Path, cfg: TextTaskConfig) -> TokenData:
    meta = path / "meta.pkl"
    if meta.is_file():
        vocabulary = read_meta(meta)
        codec = CharTokenizer("".join(vocabulary[i] for i in range(len(vocabulary))))
        if cfg.tokenizer != "char":
            raise ConfigError(f"{meta} holds a character vocabulary: set task.tokenizer=char")
    else:
        codec = run_tokenizer(cfg, path)
    val = TokenStream([raw_tokens(path / "val.bin")]) if (path / "val.bin").is_file() else None
    return TokenData(TokenStream([raw_tokens(path / "train.bin")]), val, codec, f"nanoGPT data at {path}")


def run_tokenizer(cfg: TextTaskConfig, path: Path) -> Tokenizer:
    """The run's own tokenizer, for ids that came without one (every batch is checked against
    its vocabulary)."""
    if cfg.tokenizer == "char":
        raise ConfigError(f"{path} holds token ids without a character vocabulary: read them with "
                          "task.tokenizer=gpt2 (or another tiktoken encoding) or bytes")
    return build_tokenizer(cfg.tokenizer, cfg.tokenizer_file)


class PlainData(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numbers only: a meta.pkl cannot run code."""

    def find_class(self, module, name):
        raise ConfigError(f"meta.pkl refers to {module}.{name}: txtrain reads plain vocabularies only")


def read_meta(path: Path) -> dict[int, str]:
    try:
        with path.open("rb") as file:
            meta = PlainData(file).load()
        return {int(i): str(ch) for i, ch in meta["itos"].items()}
    except ConfigError:
        raise
    except Exception as error:
        raise ConfigError(f"{path} is not nanoGPT's meta.pkl (a dict with itos): {error}") from None
