"""Where shard sets live: a local folder, or a URL (file://, http(s):// with range requests, and any
fsspec protocol, e.g. s3:// or gs:// with the `s3` / `gcs` extra installed).

Every read of a shard set goes through here: whole files (manifest, index), byte ranges (one region's
members, for random access) and sequential streams (webdataset's tar iterator). Transient failures
(connection reset or refused, timeouts, HTTP 5xx, a short read) are retried with exponential backoff;
a missing file is a FileNotFoundError naming the URL. Names read from a manifest are data: `child`
accepts only plain relative paths inside the shard set, so a manifest can neither run a `pipe:` command
nor point a reader at another host.
"""
from __future__ import annotations

import http.client
import io
import logging
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TypeVar

import webdataset as wds

log = logging.getLogger(__name__)

ATTEMPTS = 6  # first try + 5 retries: 0.1 + 0.2 + ... + 1.6 s of backoff
BACKOFF_S = 0.1
TIMEOUT_S = 60.0
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # protocol -> pip extra providing it
TRANSIENT = (ConnectionError, TimeoutError, socket.timeout, http.client.IncompleteRead,
             http.client.BadStatusLine, urllib.error.URLError)

T = TypeVar("T")


class TransientReadError(OSError):
    """A read that may succeed when tried again (a 5xx answer, a short read)."""


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def local_path(location: str | Path) -> Path | None:
    """The filesystem path of a plain path or file:// URL; None for other URLs."""
    text = str(location)
    if text.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
    return None if is_url(text) else Path(text)


def children(root: str | Path, names: Sequence[str]) -> list[str]:
    """The locations of `names` (a manifest's file names, e.g. part-0000-of-0002/shard-000001.tar) in `root`."""
    for name in names:
        if not name or "\\" in name or ":" in name or any(part in ("", ".", "..") for part in name.split("/")):
            raise ValueError(f"{root}: {name!r} is not a file inside the shard set (a manifest names files by "
                             "relative paths only)")
    path = local_path(root)
    if path is not None:
        return [os.path.join(path, name) for name in names]
    base = str(root).rstrip("/")
    return [f"{base}/{urllib.parse.quote(name)}" for name in names]


def child(root: str | Path, name: str) -> str:
    """The location of one file named by a manifest (see children)."""
    return children(root, [name])[0]


def parent(location: str | Path) -> str:
    """The folder a file's location is in (a URL stays a URL)."""
    path = local_path(location)
    if path is not None:
        return str(path.parent)
    return str(location).rsplit("/", 1)[0]


# ------------------------------------------------------------------------------------------ retries
def _retrying(location: str, what: Callable[[], T]) -> T:
    for attempt in range(ATTEMPTS):
        try:
            return what()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                raise FileNotFoundError(f"{location}: not found (HTTP 404)") from None
            if exc.code < 500:
                raise OSError(f"{location}: HTTP {exc.code} {exc.reason}") from None
            error: Exception = exc
        except (TransientReadError, *TRANSIENT) as exc:
            error = exc
        if attempt + 1 < ATTEMPTS:
            log.warning("%s: %s; retrying in %.1f s", location, error, BACKOFF_S * 2 ** attempt)
            time.sleep(BACKOFF_S * 2 ** attempt)
    raise OSError(f"{location}: failed {ATTEMPTS} times, last: {type(error).__name__}: {error}")


def _http_get(url: str, offset: int = 0, size: int | None = None) -> http.client.HTTPResponse:
    headers = {}
    if offset or size is not None:
        headers["Range"] = f"bytes={offset}-" + ("" if size is None else str(offset + size - 1))
    response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    if headers and response.status != 206:
        response.close()
        raise OSError(f"{url}: the server ignores range requests (answered {response.status}); serve the "
                      "shards from one that supports them")
    return response


def _fsspec(location: str):
    """(filesystem, path) for a URL of another protocol, or a clear error naming the extra to install."""
    protocol = location.split("://", 1)[0]
    try:
        import fsspec
        return fsspec.core.url_to_fs(location)
    except ImportError as exc:
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'hipt-e2e[{extra}]'" if extra else f"install fsspec and its {protocol} filesystem"
        raise ImportError(f"{location}: reading {protocol}:// needs {hint} ({exc})") from None
    except ValueError as exc:  # fsspec knows no such protocol
        raise ValueError(f"{location}: no reader for {protocol}:// ({exc})") from None


# ------------------------------------------------------------------------------------------ reads
def read_bytes(location: str | Path, offset: int = 0, size: int | None = None) -> bytes:
    """`size` bytes at `offset` (to the end when None) of a local file or URL."""
    location = str(location)
    path = local_path(location)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"{location}: no such file")
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(-1 if size is None else size)

    def attempt() -> bytes:
        if location.startswith(("http://", "https://")):
            with _http_get(location, offset, size) as response:
                data = response.read()
        else:
            fs, fs_path = _fsspec(location)
            if not fs.exists(fs_path):
                raise FileNotFoundError(f"{location}: no such file")
            data = fs.cat_file(fs_path, start=offset, end=None if size is None else offset + size)
        if size is not None and len(data) != size:
            raise TransientReadError(f"short read: {len(data)} of {size} bytes at {offset}")
        return data

    return _retrying(location, attempt)


def exists(location: str | Path) -> bool:
    location = str(location)
    path = local_path(location)
    if path is not None:
        return path.exists()
    try:
        read_bytes(location, 0, 1)
    except FileNotFoundError:
        return False
    return True


class _ResumingHTTPStream(io.RawIOBase):
    """A sequential HTTP body that reconnects where it broke off (a Range request from the bytes read)."""

    def __init__(self, url: str) -> None:
        self.url, self.position, self.end, self.response = url, 0, None, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        def attempt() -> bytes:
            if self.response is None:
                self.response = _http_get(self.url, self.position)
                length = self.response.headers.get("Content-Length")
                self.end = None if length is None else self.position + int(length)
            try:
                data = self.response.read(len(buffer))
                if not data and self.end is not None and self.position < self.end:
                    raise TransientReadError(f"connection closed at byte {self.position} of {self.end}")
                return data
            except BaseException:
                self.response.close()
                self.response = None
                raise
        data = _retrying(self.url, attempt)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
        super().close()


def open_stream(location: str | Path) -> BinaryIO:
    """A file object reading a local file or URL from its start (retried and resumed when remote)."""
    location = str(location)
    path = local_path(location)
    if path is not None:
        if not path.is_file():
            raise FileNotFoundError(f"{location}: no such file")
        return open(path, "rb")
    if location.startswith(("http://", "https://")):
        return io.BufferedReader(_ResumingHTTPStream(location), buffer_size=1 << 20)
    fs, fs_path = _fsspec(location)
    if not fs.exists(fs_path):
        raise FileNotFoundError(f"{location}: no such file")
    return fs.open(fs_path, "rb")


def tar_samples(location: str | Path) -> Iterator[dict]:
    """The webdataset samples (key -> bytes) of one shard, read sequentially from wherever it is."""
    with open_stream(location) as stream:
        files = wds.tariterators.tar_file_expander([{"url": str(location), "stream": stream}])
        yield from wds.tariterators.group_by_keys(files)
