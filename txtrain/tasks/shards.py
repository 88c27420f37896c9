"""Token shards on disk, and a stream of tokens read across them without loading them.

A shard is llm.c's and modded-nanogpt's format: a header of 256 little-endian int32 (magic,
version, token count, then zeros), then the tokens. Magic 20240520 version 1 holds uint16
tokens (GPT-2's vocabulary fits); magic 20240801 version 7, llm.c's choice for Llama 3, holds
uint32 tokens. nanoGPT's ``train.bin``/``val.bin`` are the same tokens as raw uint16 without
a header.

A ``TokenStream`` is several such files read as one sequence: a window at global offset ``i``
may begin in one shard and end in the next. Each file is memory-mapped on first use, so only
the pages of the windows read are ever loaded, whatever the size of the dataset.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from txtrain.config import ConfigError

HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
FORMATS = {(20240520, 1): np.dtype("<u2"), (20240801, 7): np.dtype("<u4")}  # (magic, version) -> tokens


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest shard dtype that holds every id of a vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def write_shard(path: Path, tokens: np.ndarray) -> str:
    """Write ``tokens`` as one shard at ``path``, published by a rename (a reader sees the
    whole shard or none); its sha256."""
    dtype = np.dtype(tokens.dtype).newbyteorder("<")
    (magic, version), = [key for key, kind in FORMATS.items() if kind == dtype]
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    with partial.open("wb") as out:
        for part in (header.tobytes(), np.ascontiguousarray(tokens, dtype=dtype).tobytes()):
            out.write(part)
            digest.update(part)
    os.replace(partial, path)
    return digest.hexdigest()


@dataclass(frozen=True)
class Shard:
    """Where a file's tokens are: ``n_tokens`` of ``dtype`` from byte ``offset``."""

    path: Path
    dtype: np.dtype
    n_tokens: int
    offset: int = HEADER_BYTES


def read_shard_header(path: Path) -> Shard:
    """The shard at ``path``, its header checked against the file's size (a ``ConfigError``
    saying what is wrong otherwise). Reads 1 KiB, whatever the shard's size."""
    size = path.stat().st_size
    with path.open("rb") as file:
        header = np.frombuffer(file.read(HEADER_BYTES), dtype="<i4")
    if len(header) < HEADER_INTS:
        raise ConfigError(f"{path} is {size} bytes, shorter than a shard's {HEADER_BYTES}-byte header: "
                          "truncated, or not a token shard")
    magic, version, n_tokens = (int(x) for x in header[:3])
    dtype = FORMATS.get((magic, version))
    if dtype is None:
        known = ", ".join(f"magic {m} version {v}" for m, v in FORMATS)
        raise ConfigError(f"{path} is not a token shard txtrain reads: its header says magic {magic} "
                          f"version {version} (known: {known})")
    expected = HEADER_BYTES + n_tokens * dtype.itemsize
    if n_tokens < 0 or size != expected:
        raise ConfigError(f"{path} holds {size:,} bytes but its header promises {n_tokens:,} tokens "
                          f"({expected:,} bytes): the shard is truncated or damaged; prepare it again")
    return Shard(path, dtype, n_tokens)


def raw_tokens(path: Path, dtype: str = "<u2") -> Shard:
    """A headerless file of tokens (nanoGPT's train.bin and val.bin)."""
    dtype = np.dtype(dtype)
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise ConfigError(f"{path} is {size:,} bytes, not a whole number of {dtype.itemsize}-byte tokens: "
                          "truncated or damaged")
    return Shard(path, dtype, size // dtype.itemsize, offset=0)


class TokenStream:
    """Shards read as one sequence of tokens; ``stream[a:b]`` is a view of part of it."""

    def __init__(self, shards: list[Shard], start: int = 0, stop: int | None = None):
        self.shards = [shard for shard in shards if shard.n_tokens > 0]
        self.ends = np.cumsum([shard.n_tokens for shard in self.shards], dtype=np.int64)
        total = int(self.ends[-1]) if len(self.ends) else 0
        self.start, self.stop = start, total if stop is None else stop
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, part: slice) -> "TokenStream":
        start, stop, step = part.indices(len(self))
        if step != 1:
            raise ValueError("a token stream slices with step 1 only")
        view = TokenStream.__new__(TokenStream)
        view.shards, view.ends, view._maps = self.shards, self.ends, self._maps  # one set of maps
        view.start, view.stop = self.start + start, self.start + max(start, stop)
        return view

    @property
    def max_id(self) -> int:
        """The largest id any of its shards can hold."""
        return max((np.iinfo(shard.dtype).max for shard in self.shards), default=0)

    def read(self, first: int, length: int) -> np.ndarray:
        """Tokens ``first .. first+length`` of this stream, as int64."""
        if first < 0 or first + length > len(self):
            raise IndexError(f"tokens {first}..{first + length} of a stream of {len(self)}")
        out = np.empty(length, dtype=np.int64)
        at, done = self.start + first, 0
        while done < length:
            index = int(np.searchsorted(self.ends, at, side="right"))
            begins = int(self.ends[index]) - self.shards[index].n_tokens
            take = min(length - done, int(self.ends[index]) - at)
            out[done:done + take] = self.tokens(index)[at - begins: at - begins + take]
            at, done = at + take, done + take
        return out

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """Rows ``stream[s : s+length]`` for each start, as one (len(starts), length) array."""
        return np.stack([self.read(int(s), length) for s in starts]) if len(starts) else \
            np.empty((0, length), dtype=np.int64)

    def tokens(self, index: int) -> np.ndarray:
        if index not in self._maps:
            shard = self.shards[index]
            self._maps[index] = np.memmap(shard.path, dtype=shard.dtype, mode="r",
                                          offset=shard.offset, shape=(shard.n_tokens,))
        return self._maps[index]
