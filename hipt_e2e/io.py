"""File helpers every writer uses: atomic writes and hashing."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, BinaryIO


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write to `path.tmp` and rename over `path` only when the block finishes: no partial file is left."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as handle:
        handle.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    with open(path, "rb") as handle:
        return sha256_stream(handle, chunk)


def sha256_stream(handle: BinaryIO, chunk: int = 1 << 22) -> str:
    """The sha256 of what a file object reads from where it stands to its end."""
    digest = hashlib.sha256()
    while block := handle.read(chunk):
        digest.update(block)
    return digest.hexdigest()
