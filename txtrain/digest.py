"""One checksum for every file txtrain verifies or fingerprints (checkpoints, corpora, BPE
ranks), read in chunks: a corpus may be far larger than memory."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
