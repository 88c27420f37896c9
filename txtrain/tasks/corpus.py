"""Finding a text corpus: a .txt file or a folder of them, or a download kept in the cache.

Every mistake here (no such path, a folder without text, an empty corpus, a failed or
corrupted download) is a ``ConfigError``: one line that says what to do. (Files that are not
UTF-8 text are refused where they are read: ``documents.read_text_file``.)
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from txtrain.digest import file_sha256
from txtrain.config import ConfigError, CorpusConfig


def cache_root(configured: str | None) -> Path:
    """Where tokens and downloads are kept: task.cache_dir, else $TXTRAIN_CACHE, else
    $XDG_CACHE_HOME/txtrain (~/.cache/txtrain)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("TXTRAIN_CACHE"):
        return Path(os.environ["TXTRAIN_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "txtrain"


@dataclass
class Corpus:
    files: list[Path]  # in a fixed order: the token stream is these files, one after another
    root: Path

    def fingerprint(self) -> str:
        """A hash of every file's name (relative to the corpus) and content."""
        digest = hashlib.sha256()
        for file in self.files:
            digest.update(file.relative_to(self.root).as_posix().encode() + b"\0")
            digest.update(bytes.fromhex(file_sha256(file)))
        return digest.hexdigest()

    @property
    def n_bytes(self) -> int:
        return sum(file.stat().st_size for file in self.files)


def find_corpus(cfg: CorpusConfig, cache_dir: str | None) -> Corpus:
    """The corpus at ``cfg.path``; if there is none there and ``cfg.url`` is set, the download
    (fetched once into the cache and verified)."""
    path = Path(cfg.path).expanduser() if cfg.path else None
    if path is not None and path.exists():
        corpus = local_corpus(path)
    elif cfg.url:
        corpus = local_corpus(download(cfg.url, cfg.sha256, cache_root(cache_dir) / "downloads"))
    elif path is None:
        raise ConfigError("the text task needs a corpus: set task.data.path to a .txt file or a "
                          "folder of .txt files")
    else:
        raise ConfigError(f"task.data.path={cfg.path}: no such file or folder; point it at a .txt "
                          "file or a folder of .txt files (task.data.path=/path/to/corpus)")
    if corpus.n_bytes == 0:
        raise ConfigError(f"the corpus at {corpus.root} is empty")
    return corpus


def local_corpus(path: Path) -> Corpus:
    if path.is_file():
        return Corpus([path], path.parent)
    files = sorted(p for p in path.rglob("*.txt") if p.is_file())
    if not files:
        raise ConfigError(f"task.data.path={path} is a folder without .txt files")
    return Corpus(files, path)


def download(url: str, sha256: str | None, folder: Path) -> Path:
    """``url`` saved under ``folder`` (once; later runs reuse it), checked against ``sha256``."""
    name = Path(urllib.parse.urlparse(url).path).name or "corpus.txt"
    target = folder / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if target.is_file() and (sha256 is None or file_sha256(target) == sha256):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{name}.{os.getpid()}.part")
    print(f"downloading {url} -> {target}", flush=True)
    try:
        urllib.request.urlretrieve(url, partial)
    except (urllib.error.URLError, OSError, ValueError) as error:
        partial.unlink(missing_ok=True)
        reason = getattr(error, "reason", None) or error
        raise ConfigError(f"could not download {url} ({reason}); download it yourself and set "
                          "task.data.path=<the file>") from error
    if sha256 is not None and (got := file_sha256(partial)) != sha256:
        partial.unlink()
        raise ConfigError(f"the download of {url} has sha256 {got}, not task.data.sha256={sha256}; "
                          "the file changed or the download was corrupted")
    os.replace(partial, target)
    return target
