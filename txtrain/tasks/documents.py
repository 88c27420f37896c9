"""Documents to tokenize, read from the files people keep text in.

An input is a ``.txt`` file (one document), a ``.jsonl`` or ``.jsonl.gz`` file (a document per
line, in a text field), a ``.parquet`` file (a document per row, in a text column, through
pyarrow), a folder of such files (searched recursively, in name order), or ``hf:NAME[:CONFIG]``,
a Hugging Face dataset (through ``datasets``). Documents come in a fixed order, each with the
input bytes read to reach it, for a progress bar over the input.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from txtrain.config import ConfigError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Source:
    name: str  # a path, or hf:NAME[:CONFIG]
    n_bytes: int | None  # None: not known before reading (a remote dataset)

    @property
    def path(self) -> Path:
        return Path(self.name)


def kind_of(path: Path) -> str | None:
    return next((suffix for suffix in SUFFIXES if path.name.endswith(suffix)), None)


def find_sources(inputs: list[str]) -> list[Source]:
    """Every input file (folders expanded, in name order) as a source; a ``ConfigError`` for a
    missing path or a folder with nothing to read."""
    sources = []
    for name in inputs:
        if name.startswith(HF_PREFIX):
            sources.append(Source(name, None))
            continue
        path = Path(name).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and kind_of(p))
            if not files:
                raise ConfigError(f"{path} is a folder without {', '.join(SUFFIXES)} files")
        elif path.is_file():
            if kind_of(path) is None:
                raise ConfigError(f"{path}: txtrain reads {', '.join(SUFFIXES)} files, not {path.suffix or 'this'}")
            files = [path]
        else:
            raise ConfigError(f"{path}: no such file or folder")
        sources += [Source(str(file), file.stat().st_size) for file in files]
    if not sources:
        raise ConfigError("no input given: name .txt, .jsonl, .jsonl.gz or .parquet files or folders")
    return sources


def read_text_file(path: Path) -> str:
    """A UTF-8 text file's content (a ``ConfigError`` for anything else)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start} is {error.object[error.start]:#x}); "
                          "convert it to UTF-8 or leave it out") from error
    if "\0" in text:
        raise ConfigError(f"{path} holds NUL bytes: it looks binary, not text; leave it out")
    return text


def documents(source: Source, text_field: str = "text") -> Iterator[tuple[str, int]]:
    """(text, input bytes read since the previous document) for each document of ``source``."""
    if source.name.startswith(HF_PREFIX):
        yield from hf_documents(source.name[len(HF_PREFIX):], text_field)
        return
    kind = kind_of(source.path)
    if kind == ".txt":
        yield read_text_file(source.path), source.n_bytes
    elif kind == ".parquet":
        yield from parquet_documents(source.path, text_field)
    else:
        yield from jsonl_documents(source.path, text_field, compressed=kind == ".jsonl.gz")


def jsonl_documents(path: Path, field: str, compressed: bool) -> Iterator[tuple[str, int]]:
    with path.open("rb") as raw:
        lines = gzip.GzipFile(fileobj=raw) if compressed else raw
        read, number = 0, 0
        while True:
            try:
                line = lines.readline()
            except (EOFError, OSError) as error:  # a damaged or truncated .gz
                raise ConfigError(f"{path}: {error}") from None
            if not line:
                return
            number += 1
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise ConfigError(f"{path}, line {number}: not a JSON object ({error})") from None
            yield field_text(record, field, f"{path}, line {number}"), raw.tell() - read
            read = raw.tell()


def field_text(record, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise ConfigError(f"{where} has no field {field!r} (it has: {keys}); name the text field with "
                          "--text-field")
    text = record[field]
    if not isinstance(text, str):
        raise ConfigError(f"{where}: the field {field!r} holds {type(text).__name__}, not text")
    return text


def parquet_documents(path: Path, column: str) -> Iterator[tuple[str, int]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading .parquet needs pyarrow: pip install 'txtrain[parquet]'") from None
    table = pq.ParquetFile(path)
    if column not in table.schema_arrow.names:
        raise ConfigError(f"{path} has no column {column!r} (it has: {', '.join(table.schema_arrow.names)}); "
                          "name the text column with --text-field")
    rows, size = max(1, table.metadata.num_rows), path.stat().st_size
    done = 0
    for batch in table.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text is None:
                continue
            done += 1
            yield text, size * done // rows - size * (done - 1) // rows


def hf_documents(spec: str, field: str) -> Iterator[tuple[str, int]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError("reading a Hugging Face dataset needs datasets: pip install 'txtrain[hf]'") from None
    name, _, config = spec.partition(":")
    try:
        rows = datasets.load_dataset(name, config or None, split="train", streaming=True)
        for row in rows:
            yield field_text(row, field, f"hf:{spec}"), len(row.get(field) or "")
    except ConfigError:
        raise
    except Exception as error:  # offline, no such dataset, no access
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"could not read the Hugging Face dataset {name}: {first}; offline, download "
                          "it elsewhere and pass the files") from None
