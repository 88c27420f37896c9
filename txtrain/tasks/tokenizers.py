"""Tokenizers for the text task: text <-> token ids.

``gpt2`` (or any other tiktoken encoding) is byte-pair encoding through tiktoken; ``bytes`` is
the UTF-8 bytes (256 symbols, needs nothing); ``char`` is the corpus's own characters. Each
tokenizer can describe itself as a small dict (``state``) that rebuilds it without the corpus,
which checkpoints keep so that sampling needs only the checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Protocol

from txtrain.config import ConfigError
from txtrain.digest import file_sha256

SIMPLE = ("bytes", "char")
# The encodings whose ranks a local .tiktoken file may supply: GPT-2's byte-pair ranks
# (tiktoken names them gpt2 and r50k_base) with its one special token.
GPT2_NAMES = ("gpt2", "r50k_base")
GPT2_VOCAB = 50257


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    end_of_text: int | None  # separates documents, and ends a generation; None if there is none

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def state(self) -> dict:
        """What rebuilds this tokenizer (with ``from_state``), as plain JSON-able values."""


class ByteTokenizer:
    name = "bytes"
    vocab_size = 256
    end_of_text = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def state(self) -> dict:
        return {"kind": "bytes"}


class CharTokenizer:
    """One token per distinct character of the corpus, in code-point order."""

    name = "char"
    end_of_text = None

    def __init__(self, symbols: str):
        self.symbols = symbols
        self.vocab_size = len(symbols)
        self.ids = {ch: i for i, ch in enumerate(symbols)}

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - self.ids.keys())
        if unknown:
            raise ConfigError(f"the characters {''.join(unknown)!r} are not in the char tokenizer's "
                              "vocabulary (the training corpus's characters)")
        return [self.ids[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.symbols[i] for i in ids)

    def state(self) -> dict:
        return {"kind": "char", "symbols": self.symbols}


class TiktokenTokenizer:
    """A tiktoken encoding by name. tiktoken downloads the ranks once into its own cache
    (``TIKTOKEN_CACHE_DIR`` moves it); ``file`` reads GPT-2's ranks from a local .tiktoken file
    instead, for machines without internet."""

    def __init__(self, name: str, file: str | None = None):
        import tiktoken

        self.name, self.file = name, file
        if file is not None:
            self.encoding = gpt2_from_file(name, Path(file).expanduser())
        else:
            known = tiktoken.list_encoding_names()
            if name not in known:
                raise ConfigError(f"task.tokenizer={name} is not a tokenizer: choose bytes, char or "
                                  f"a tiktoken encoding ({', '.join(known)})")
            try:
                self.encoding = tiktoken.get_encoding(name)
            except Exception as error:  # no network and nothing cached, most likely
                raise ConfigError(
                    f"could not fetch the {name} ranks through tiktoken ({type(error).__name__}); "
                    f"offline, point task.tokenizer_file at a local {name}.tiktoken file, or fill "
                    "tiktoken's cache (TIKTOKEN_CACHE_DIR)") from None
        self.vocab_size = self.encoding.n_vocab
        self.end_of_text = self.encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.encoding.decode(ids)

    def state(self) -> dict:
        # The ranks' digest lets a checkpoint find them again where the file has moved.
        if not hasattr(self, "_ranks_sha256"):  # once: it hashes 50k ranks
            self._ranks_sha256 = ranks_sha256(self.encoding)
        return {"kind": "tiktoken", "name": self.name, "file": self.file,
                "ranks_sha256": self._ranks_sha256}

    def fingerprint(self) -> str:
        """Names the ranks: the encoding's name, and the file's content when read from one."""
        if self.file is None:
            return self.name
        return f"{self.name}:{file_sha256(Path(self.file).expanduser())}"


def gpt2_from_file(name: str, path: Path):
    """GPT-2's encoding with its ranks read from ``path`` (the split pattern and the special
    token are tiktoken's own)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

    if name not in GPT2_NAMES:
        raise ConfigError(f"task.tokenizer_file works with task.tokenizer=gpt2 (or r50k_base), not "
                          f"{name}; for {name} offline, fill tiktoken's cache (TIKTOKEN_CACHE_DIR)")
    if not path.is_file():
        raise ConfigError(f"task.tokenizer_file={path}: no such file")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as error:
        raise ConfigError(f"task.tokenizer_file={path} is not a .tiktoken ranks file "
                          f"({type(error).__name__})") from None
    if len(ranks) != GPT2_VOCAB - 1 or sorted(ranks.values()) != list(range(GPT2_VOCAB - 1)):
        raise ConfigError(f"task.tokenizer_file={path} holds {len(ranks)} ranks, not GPT-2's "
                          f"{GPT2_VOCAB - 1}; is it the gpt2 / r50k_base file?")
    return tiktoken.Encoding(name, pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: GPT2_VOCAB - 1}, explicit_n_vocab=GPT2_VOCAB)


def build_tokenizer(name: str, file: str | None = None, corpus_text: str | None = None) -> Tokenizer:
    """The tokenizer ``name``; ``char`` learns its symbols from ``corpus_text``."""
    if name == "bytes":
        return ByteTokenizer()
    if name == "char":
        if corpus_text is None:
            raise ValueError("the char tokenizer is built from the corpus's text")
        return CharTokenizer.from_text(corpus_text)
    return TiktokenTokenizer(name, file)


class MaskedTokenizer:
    """A tokenizer with one more token, the mask, spelled ``[MASK]`` in text: what the encoder
    learns to fill (``model.arch=encoder``). Its id is the next after the tokenizer's own, so
    the data's ids are unchanged.

    A mask stands for one token. GPT-2's tokens carry the space before a word (" justice"), so
    the space before a ``[MASK]`` belongs to the mask: "What is [MASK]?" asks for a token such
    as " justice". Under bytes and char a mask is one byte or character.
    """

    spelling = "[MASK]"

    def __init__(self, base: Tokenizer):
        self.base = base
        self.name = f"{base.name}+mask"
        self.mask_id = base.vocab_size
        self.vocab_size = base.vocab_size + 1
        self.end_of_text = base.end_of_text
        self.space_joins_word = isinstance(base, TiktokenTokenizer)

    def encode(self, text: str) -> list[int]:
        *before_masks, last = text.split(self.spelling)
        ids: list[int] = []
        for piece in before_masks:
            if self.space_joins_word and piece.endswith(" "):
                piece = piece[:-1]
            ids += self.base.encode(piece) + [self.mask_id]
        return ids + self.base.encode(last)

    def decode(self, ids: list[int]) -> str:
        pieces, run = [], []
        for token in ids:
            if token == self.mask_id:
                pieces += [self.base.decode(run), self.spelling]
                run = []
            else:
                run.append(token)
        return "".join(pieces) + self.base.decode(run)

    def state(self) -> dict:
        return {"kind": "masked", "base": self.base.state()}


def ranks_sha256(encoding) -> str | None:
    """The sha256 of an encoding's ranks written as a .tiktoken file (for GPT-2's ranks, the
    file's own sha256), wherever they were read from."""
    ranks = getattr(encoding, "_mergeable_ranks", None)
    if ranks is None:
        return None
    digest = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        digest.update(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return digest.hexdigest()


def from_state(state: dict, file: str | None = None) -> Tokenizer:
    """Rebuild a tokenizer from its ``state``; ``file`` overrides where its ranks are read.
    Ranks read from a file that has since moved come from tiktoken's cache instead, if it holds
    the same ranks."""
    kind = state["kind"]
    if kind == "masked":
        return MaskedTokenizer(from_state(state["base"], file))
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(state["symbols"])
    name, recorded = state["name"], state.get("file")
    if file is not None or recorded is None or Path(recorded).expanduser().is_file():
        tokenizer = TiktokenTokenizer(name, file or recorded)
    else:
        tokenizer = from_tiktoken_cache(name, recorded)
    expected = state.get("ranks_sha256")
    if expected is not None and ranks_sha256(tokenizer.encoding) not in (expected, None):
        raise ConfigError(f"the {name} ranks read from {tokenizer.file or 'tiktoken'} differ from "
                          "those the model was trained with")
    return tokenizer


def from_tiktoken_cache(name: str, moved_file: str) -> TiktokenTokenizer:
    """GPT-2's ranks (tiktoken names them gpt2 and r50k_base) from tiktoken, in place of a
    ranks file that is gone."""
    for candidate in dict.fromkeys([name, *GPT2_NAMES] if name in GPT2_NAMES else [name]):
        try:
            tokenizer = TiktokenTokenizer(candidate)
        except ConfigError:
            continue
        tokenizer.name = name
        return tokenizer
    raise ConfigError(f"the {name} ranks were read from {moved_file}, which is gone, and tiktoken "
                      f"has no copy (offline, nothing cached); give the file's new place "
                      "(txtrain-sample --tokenizer-file, or task.tokenizer_file)")
