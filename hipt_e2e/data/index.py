"""The shard index: `index.npz` beside manifest.json, what random access to a shard set needs.

Per sample its shard, key, slide and region index, and per member the byte offset, size and CRC-32 inside the
tar, so a read needs neither the shards' headers nor trust in the bytes. It records the sha256 of the shards
it describes: a set without one, or a stale one, is indexed on first open (and saved when the folder is writable).
"""
from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hipt_e2e.data.storage import child, local_path, open_stream, read_bytes
from hipt_e2e.errors import UserError
from hipt_e2e.io import atomic_open

log = logging.getLogger(__name__)

INDEX = "index.npz"
INDEX_VERSION = 1
Row = tuple[str, str | None, int, dict[str, tuple[int, int, int]]]  # key, slide, region index, ext -> (offset, size, crc)


class ShardDataError(UserError, OSError):
    """Shard bytes that differ from what the index recorded: corrupted in storage or in transit."""


def index_file(path: str | Path) -> list[Row]:
    """The index rows of one shard read sequentially: members grouped by key (the name up to its first dot,
    as webdataset groups them), slide and region index from the `json` member."""
    rows: list[Row] = []
    with open_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = member.name.split(".", 1)
            data = tar.extractfile(member).read()
            if not rows or rows[-1][0] != key:
                rows.append((key, None, -1, {}))
            rows[-1][3][ext] = (member.offset_data, member.size, zlib.crc32(data))
            if ext == "json":
                record = json.loads(data)
                region = record.get("region_index")
                rows[-1] = (key, record.get("slide_id"), -1 if region is None else region, rows[-1][3])
    return rows


@dataclass
class ShardIndex:
    """Column arrays over all samples (n) and member extensions (m)."""

    shard: np.ndarray  # int32 [n]: position in manifest["shards"]
    key: np.ndarray  # bytes [n] (UTF-8)
    slide: np.ndarray  # int32 [n] into slide_ids; -1: no slide (unlabelled tiles)
    slide_ids: np.ndarray  # str [s]
    region_index: np.ndarray  # int32 [n]; -1: none (slide-embedding samples)
    exts: np.ndarray  # str [m]
    offset: np.ndarray  # int64 [n, m]: member data offset in its tar; -1: the sample has no such member
    size: np.ndarray  # int64 [n, m]
    crc32: np.ndarray  # uint32 [n, m]
    shard_sha256: np.ndarray  # str [shards]: the shards this index describes

    def __len__(self) -> int:
        return len(self.shard)

    @classmethod
    def from_rows(cls, rows_per_shard: Sequence[Sequence[Row]], shard_sha256: Sequence[str]) -> ShardIndex:
        rows = [row for shard_rows in rows_per_shard for row in shard_rows]
        exts = sorted({ext for row in rows for ext in row[3]})
        slide_ids = sorted({row[1] for row in rows if row[1] is not None})
        slide_code = {slide: code for code, slide in enumerate(slide_ids)}
        members = np.array([[row[3].get(ext, (-1, -1, -1)) for ext in exts] for row in rows],
                           dtype=np.int64).reshape(len(rows), len(exts), 3)
        return cls(
            shard=np.repeat(np.arange(len(rows_per_shard), dtype=np.int32), [len(r) for r in rows_per_shard]),
            key=np.array([row[0].encode() for row in rows], dtype=bytes),
            slide=np.array([slide_code.get(row[1], -1) for row in rows], dtype=np.int32),
            slide_ids=np.array(slide_ids, dtype=str), region_index=np.array([row[2] for row in rows], dtype=np.int32),
            exts=np.array(exts, dtype=str), offset=members[..., 0], size=members[..., 1],
            crc32=members[..., 2].astype(np.uint32), shard_sha256=np.array(list(shard_sha256), dtype=str))

    @classmethod
    def from_bytes(cls, data: bytes, where: str) -> ShardIndex:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            if int(arrays["version"]) != INDEX_VERSION:
                raise UserError(f"{where}: index version {int(arrays['version'])}, this reader knows {INDEX_VERSION}")
            return cls(**{name: arrays[name] for name in cls.__dataclass_fields__})

    def write(self, root: str | Path) -> None:
        """Atomically to root/index.npz (a local folder)."""
        with atomic_open(Path(root) / INDEX) as handle:
            np.savez(handle, version=np.int32(INDEX_VERSION), **self.__dict__)

    def rows(self, position: int) -> list[Row]:
        """The rows of shard `position`, as index_file gives them."""
        return [(self.key[r].decode(), str(self.slide_ids[self.slide[r]]) if self.slide[r] >= 0 else None,
                 int(self.region_index[r]),
                 {str(ext): (int(self.offset[r, j]), int(self.size[r, j]), int(self.crc32[r, j]))
                  for j, ext in enumerate(self.exts) if self.offset[r, j] >= 0})
                for r in np.flatnonzero(self.shard == position)]

    def member_range(self, row: int) -> tuple[int, int]:
        """(first byte, end) spanning every member of sample `row` (they are contiguous but for tar headers)."""
        present = self.offset[row] >= 0
        return int(self.offset[row][present].min()), int((self.offset[row] + self.size[row])[present].max())

    def read_sample(self, row: int, data: bytes, start: int, where: str) -> dict[str, bytes]:
        """Sample `row`'s members (ext -> bytes) cut from `data` (the shard's bytes from `start`), CRC-checked."""
        key = self.key[row].decode()
        members = {}
        for j, ext in enumerate(self.exts):
            offset, size = int(self.offset[row, j]), int(self.size[row, j])
            if offset < 0:
                continue
            member = data[offset - start:offset - start + size]
            if len(member) != size or zlib.crc32(member) != int(self.crc32[row, j]):
                raise ShardDataError(f"{where}: member {key}.{ext} (bytes {offset}-{offset + size}) differs from "
                                     "the index's checksum: corrupted in storage or in transit")
            members[str(ext)] = member
        return {"__key__": key, **members}


def write_index(root: str | Path, shards: Sequence[Mapping], rows: Mapping[str, Sequence[Row]] | None = None) -> ShardIndex:
    """Write root/index.npz of a local shard set from recorded rows (reading a shard only when it has none)."""
    rows = rows or {}
    index = ShardIndex.from_rows([rows[s["name"]] if s["name"] in rows else index_file(Path(root) / s["name"])
                                  for s in shards], [s["sha256"] for s in shards])
    index.write(root)
    return index


def open_index(manifest: Mapping) -> ShardIndex:
    """The index of a shard set (manifest from load_manifest), built when absent or stale (see the module)."""
    root = manifest["root"]
    location = child(root, INDEX)
    expected = [shard["sha256"] for shard in manifest["shards"]]
    try:
        index = ShardIndex.from_bytes(read_bytes(location), location)
    except FileNotFoundError:
        log.info("%s: no index (a shard set built before it); indexing its %d shards once", root, len(expected))
    else:
        if index.shard_sha256.tolist() == expected:
            return index
        log.warning("%s does not describe the shards the manifest lists (rebuilt or replaced); reindexing", location)
    index = ShardIndex.from_rows([index_file(child(root, shard["name"])) for shard in manifest["shards"]], expected)
    folder = local_path(root)
    if folder is not None and os.access(folder, os.W_OK):
        index.write(folder)
        log.info("wrote %s (%d samples)", folder / INDEX, len(index))
    return index
