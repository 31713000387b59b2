"""Every read of a shard set: a local folder or a URL (file://, http(s):// with range requests, any fsspec
protocol such as s3:// or gs://). Whole files, byte ranges and resumed sequential streams; transient failures
are retried with capped backoff until the server's outage exceeds the retry budget (README: shared storage).
Names read from a manifest are data: `children` accepts only relative paths inside the set, so a manifest can
neither run a `pipe:` command nor point a reader at another host. The settings reach every process of a run
through the environment, which `configure` writes.
"""
from __future__ import annotations

import http.client
import io
import json
import logging
import os
import random
import socket
import ssl
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import webdataset as wds
import yaml

from hipt_e2e.config import Settings, bound
from hipt_e2e.errors import InputError, MissingExtraError, SettingError, StorageError

log = logging.getLogger(__name__)

RETRY_BUDGET_ENV = "HIPT_RETRY_BUDGET_S"
STORAGE_OPTIONS_ENV = "HIPT_STORAGE_OPTIONS"
DEFAULT_RETRY_BUDGET_S = 120.0  # a web server's or object store's restart, a network blip
BACKOFF_S = 0.1  # the first wait; each next one doubles (times a random 0.5..1: readers do not retry in step)
MAX_WAIT_S = 10.0  # the longest wait: a server that is back is noticed within this
TIMEOUT_S = 60.0
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # protocol -> pip extra providing it
TRANSIENT = (ConnectionError, TimeoutError, socket.timeout, http.client.IncompleteRead,
             http.client.BadStatusLine, urllib.error.URLError)


@dataclass(frozen=True)
class StorageSettings(Settings):
    """The data.* settings of every recipe that reads shard sets (recipe settings apply them: `configure`)."""

    retry_budget_s: float | None = bound(None, 0.0)  # seconds a read waits out a server's outage; null: $HIPT_RETRY_BUDGET_S, else 120
    # fsspec options for s3:// gs:// ... (endpoint_url, profile, anon, client_kwargs); {}: $HIPT_STORAGE_OPTIONS
    storage_options: dict = field(default_factory=dict)


T = TypeVar("T")


class StorageUnavailableError(StorageError):
    """A server unreachable past the retry budget; its message survives webdataset appending to its args."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class TransientReadError(OSError):
    """A read that may succeed when tried again (a short read, a connection closed early)."""


# ------------------------------------------------------------------------------------------ settings
def configure(retry_budget_s: float | None = None, storage_options: Mapping[str, Any] | None = None) -> None:
    """The retry budget and fsspec options of this process and every process it starts (through the
    environment); None and {} keep what the environment says."""
    if retry_budget_s is not None:
        os.environ[RETRY_BUDGET_ENV] = str(_seconds(retry_budget_s, "data.retry_budget_s"))
    if storage_options:
        if not isinstance(storage_options, Mapping):
            raise SettingError(f"data.storage_options must be a mapping of fsspec options, got {type(storage_options).__name__}")
        os.environ[STORAGE_OPTIONS_ENV] = json.dumps(dict(storage_options))


def _seconds(value: object, setting: str) -> float:
    try:
        seconds = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        seconds = float("nan")
    if not seconds >= 0:
        raise SettingError(f"{setting}={value!r}: the retry budget is a number of seconds (>= 0)")
    return seconds


def retry_budget_s() -> float:
    raw = os.environ.get(RETRY_BUDGET_ENV, "")
    return _seconds(raw, RETRY_BUDGET_ENV) if raw.strip() else DEFAULT_RETRY_BUDGET_S


def storage_options() -> dict[str, Any]:
    """The fsspec options of s3:// gs:// ... reads: $HIPT_STORAGE_OPTIONS, a JSON or YAML mapping."""
    raw = os.environ.get(STORAGE_OPTIONS_ENV, "")
    if not raw.strip():
        return {}
    try:
        options = yaml.safe_load(raw)
    except yaml.YAMLError:
        options = None
    if not isinstance(options, dict):  # the text is not shown: it may hold a secret
        raise SettingError(f"{STORAGE_OPTIONS_ENV}: not a mapping of fsspec options, e.g. "
                           '{"endpoint_url": "http://minio:9000", "anon": true}')
    return options


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def local_path(location: str | Path) -> Path | None:
    """The filesystem path of a plain path or file:// URL; None for other URLs."""
    text = str(location)
    if text.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(text).path))
    return None if is_url(text) else Path(text)


def children(root: str | Path, names: Sequence[str]) -> list[str]:
    """The locations of a manifest's file names (e.g. part-0000-of-0002/shard-000001.tar) in `root`."""
    for name in names:
        if not name or "\\" in name or ":" in name or any(part in ("", ".", "..") for part in name.split("/")):
            raise InputError(root, f"{name!r} is not a file inside the shard set (a manifest names files by "
                                   "relative paths only)")
    path = local_path(root)
    if path is not None:
        return [os.path.join(path, name) for name in names]
    base = str(root).rstrip("/")
    return [f"{base}/{urllib.parse.quote(name)}" for name in names]


def child(root: str | Path, name: str) -> str:
    return children(root, [name])[0]


def parent(location: str | Path) -> str:
    path = local_path(location)
    if path is not None:
        return str(path.parent)
    return str(location).rsplit("/", 1)[0]


# ------------------------------------------------------------------------------------------ retries
@dataclass
class _Outage:
    began: float  # time.monotonic() of the server's first failed read since its last good one
    failures: int = 0


_outages: dict[str, _Outage] = {}  # server (scheme://host:port) -> its outage under way
_outage_lock = threading.Lock()


def _object_store_errors() -> tuple[type[BaseException], ...]:
    """Connection failures of object-store libraries; only a library already imported can have raised one."""
    errors: list[type[BaseException]] = []
    if (botocore := sys.modules.get("botocore.exceptions")) is not None:
        errors += [botocore.ConnectionError, botocore.HTTPClientError]  # refused, timed out, closed mid-answer
    if (aiohttp := sys.modules.get("aiohttp")) is not None:
        errors += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    return tuple(errors)


def _describe(error: BaseException) -> str:
    if type(error) is urllib.error.URLError and isinstance(error.reason, BaseException):
        error = error.reason
    return " ".join(f"{type(error).__name__}: {error}".split())


def _retrying(location: str, attempt: Callable[[], T]) -> T:
    """attempt() until it succeeds, waiting out transient failures while the server's outage is in the budget."""
    parts, waits = urllib.parse.urlsplit(location), 0
    server = f"{parts.scheme}://{parts.netloc}"
    while True:
        try:
            result = attempt()
        except (TransientReadError, *TRANSIENT, *_object_store_errors()) as exc:
            error = exc
        else:
            if server in _outages:
                _outage_ended(server)
            return result
        down_s, budget = _outage_so_far(server, location, error)
        if down_s >= budget:
            raise StorageUnavailableError(
                f"{location}: unreachable for {down_s:.1f} s, last error: {_describe(error)}; to wait longer than "
                f"{budget:g} s set data.retry_budget_s=SECONDS (or {RETRY_BUDGET_ENV}=SECONDS){_endpoint_hint(location)}"
            ) from None
        wait = min(MAX_WAIT_S, BACKOFF_S * 2 ** min(waits, 30)) * random.uniform(0.5, 1.0)
        time.sleep(min(wait, budget - down_s))  # the last try at the budget's end
        waits += 1


def _outage_so_far(server: str, location: str, error: BaseException) -> tuple[float, float]:
    """(seconds the server has been down, the budget); an outage is logged at its second failure: a dropped
    connection that one retry cures is none."""
    budget, now = retry_budget_s(), time.monotonic()
    with _outage_lock:
        outage = _outages.setdefault(server, _Outage(now))
        outage.failures += 1
        announce = outage.failures == 2
    if announce:
        log.warning("%s: %s; waiting up to %g s for %s to answer again (data.retry_budget_s / %s)",
                    location, _describe(error), budget, server, RETRY_BUDGET_ENV)
    return now - outage.began, budget


def _outage_ended(server: str) -> None:
    with _outage_lock:
        outage = _outages.pop(server, None)
    if outage is not None and outage.failures > 1:
        log.warning("%s: answering again after %.1f s down", server, time.monotonic() - outage.began)


def _endpoint_hint(location: str) -> str:
    options = storage_options()
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get("endpoint_url")
    if location.split("://", 1)[0] not in ("s3", "s3a") or endpoint or os.environ.get("AWS_ENDPOINT_URL"):
        return ""
    return ("; an S3 server other than AWS's needs its endpoint: data.storage_options.endpoint_url=URL "
            "(hipt-shards: --storage-option endpoint_url=URL) or AWS_ENDPOINT_URL=URL")


def _http_get(url: str, offset: int = 0, size: int | None = None) -> http.client.HTTPResponse:
    headers = {}
    if offset or size is not None:
        headers["Range"] = f"bytes={offset}-" + ("" if size is None else str(offset + size - 1))
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:  # 5xx: the server's trouble, retried
        if exc.code == 404:
            raise FileNotFoundError(f"{url}: not found (HTTP 404)") from None
        if exc.code < 500:
            raise StorageError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        raise
    except urllib.error.URLError as exc:  # a certificate does not get better by waiting
        if isinstance(exc.reason, ssl.SSLCertVerificationError):
            raise StorageError(f"{url}: {_describe(exc.reason)}") from None
        raise
    if headers and response.status != 206:
        response.close()
        raise StorageError(f"{url}: the server ignores range requests (answered {response.status}); serve the "
                           "shards from one that supports them")
    return response


def _fsspec(location: str):
    """(filesystem, path) for a URL of another protocol, or a clear error naming the extra to install."""
    protocol = location.split("://", 1)[0]
    options = storage_options()
    try:
        import fsspec
        return fsspec.core.url_to_fs(location, **options)
    except ImportError as exc:
        extra = EXTRAS.get(protocol)
        hint = f"pip install 'hipt-e2e[{extra}]'" if extra else f"install fsspec and its {protocol} filesystem"
        raise MissingExtraError(f"{location}: reading {protocol}:// needs {hint} ({exc})") from None
    except ValueError as exc:  # fsspec knows no such protocol
        raise SettingError(f"{location}: no reader for {protocol}:// ({exc})") from None
    except TypeError as exc:
        if not options:
            raise
        raise StorageError(f"{location}: the {protocol}:// filesystem refuses the storage options "
                           f"{sorted(options)} ({exc})") from None


def _fsspec_file(location: str):
    """(filesystem, path) of a file that exists."""
    fs, fs_path = _fsspec(location)
    if not fs.exists(fs_path):
        raise FileNotFoundError(f"{location}: no such file")
    return fs, fs_path


def _local_file(location: str) -> Path | None:
    """The path of a local location, which must be a file; None for a URL."""
    path = local_path(location)
    if path is not None and not path.is_file():
        raise FileNotFoundError(f"{location}: no such file")
    return path


# ------------------------------------------------------------------------------------------ reads
def read_bytes(location: str | Path, offset: int = 0, size: int | None = None) -> bytes:
    """`size` bytes at `offset` (to the end when None) of a local file or URL."""
    location = str(location)
    if (path := _local_file(location)) is not None:
        with open(path, "rb") as handle:
            handle.seek(offset)
            return handle.read(-1 if size is None else size)

    def attempt() -> bytes:
        if location.startswith(("http://", "https://")):
            with _http_get(location, offset, size) as response:
                data = response.read()
        else:
            fs, fs_path = _fsspec_file(location)
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


def _open_from(location: str, position: int) -> tuple[BinaryIO, int | None]:
    """A remote file read from `position`, and where it ends (None: unknown)."""
    if location.startswith(("http://", "https://")):
        response = _http_get(location, position)
        length = response.headers.get("Content-Length")
        return response, None if length is None else position + int(length)
    fs, fs_path = _fsspec_file(location)
    handle = fs.open(fs_path, "rb")
    handle.seek(position)
    return handle, getattr(handle, "size", None)


class _ResumingStream(io.RawIOBase):
    """A remote file read from its start that reconnects where it broke off (from the bytes read)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.position, self.end, self.source = 0, None, None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        def attempt() -> bytes:
            if self.source is None:
                self.source, self.end = _open_from(self.location, self.position)
            try:
                data = self.source.read(len(buffer))
                if not data and self.end is not None and self.position < self.end:
                    raise TransientReadError(f"connection closed at byte {self.position} of {self.end}")
                return data
            except BaseException:
                self._disconnect()
                raise
        data = _retrying(self.location, attempt)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def _disconnect(self) -> None:
        if self.source is not None:
            self.source.close()
            self.source = None

    def close(self) -> None:
        self._disconnect()
        super().close()


def open_stream(location: str | Path) -> BinaryIO:
    """A file object reading a local file or URL from its start (retried and resumed when remote)."""
    location = str(location)
    if (path := _local_file(location)) is not None:
        return open(path, "rb")
    return io.BufferedReader(_ResumingStream(location), buffer_size=1 << 20)


def tar_samples(location: str | Path) -> Iterator[dict]:
    """The webdataset samples (key -> bytes) of one shard, read sequentially."""
    with open_stream(location) as stream:
        files = wds.tariterators.tar_file_expander([{"url": str(location), "stream": stream}])
        yield from wds.tariterators.group_by_keys(files)
