"""Writing shards: `shard-%06d.tar` files of at most `shard_bytes`, each renamed into place when full.

After a shard is complete its name, sample count, size, sha256, per-slide counts, the position to
resume from and its index rows (hipt_e2e.data.index: member offsets, sizes, CRC-32) are appended
(fsynced) to a journal, which is what makes interrupted builds resumable and what manifests and the
index are made from. Shard building and the embedding recipes write through this class.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import webdataset as wds

from hipt_e2e.data.index import index_file
from hipt_e2e.io import sha256_file


class ShardWriter:
    """Packs samples into shard-%06d.tar files; each is renamed into place and journalled when full."""

    def __init__(self, out_dir: Path, shard_bytes: int, journal: Path, first_shard: int):
        self.out_dir, self.shard_bytes, self.journal = out_dir, shard_bytes, journal
        self.index = first_shard
        self.stream = None
        self.tar = None
        self.count = 0
        self.slides: dict[str, int] = {}
        self.open_slide_at_end = False
        self.pending_skips: list[dict] = []

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}.tar"

    def add(self, sample: dict, slide_id: str | None, position: tuple[int, int]) -> None:
        """Append a sample; `slide_id` is None for unlabelled tiles, which belong to no slide."""
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__")) + 1024 * len(sample)
        if self.tar is not None and self.count and self.stream.tell() + size > self.shard_bytes:
            self.finish(resume=position, slide_continues=slide_id in self.slides)
        if self.tar is None:
            self.stream = open(self.out_dir / (self.name + ".tmp"), "wb")
            self.tar = wds.TarWriter(self.stream, encoder=False, mtime=0)
        self.tar.write(sample)
        self.count += 1
        if slide_id is not None:
            self.slides[slide_id] = self.slides.get(slide_id, 0) + 1

    def skip(self, record: dict) -> None:
        self.pending_skips.append(record)

    def finish(self, resume: tuple[int, int] | None, slide_continues: bool = False) -> None:
        """Close the open shard (if any), rename it into place and journal it with the resume point."""
        entry: dict[str, Any] = {"resume": list(resume) if resume else None, "skipped": self.pending_skips}
        if self.tar is not None:
            self.tar.close()
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            final = self.out_dir / self.name
            os.replace(self.out_dir / (self.name + ".tmp"), final)
            entry["shard"] = {"name": self.name, "samples": self.count, "bytes": final.stat().st_size,
                              "sha256": sha256_file(final), "slides": self.slides,
                              "slide_continues": slide_continues}
            entry["index"] = index_file(final)  # read back while the shard is in the page cache
            self.index += 1
        with open(self.journal, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self.tar, self.stream, self.count, self.slides, self.pending_skips = None, None, 0, {}, []

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.stream.close()
            (self.out_dir / (self.name + ".tmp")).unlink(missing_ok=True)
            self.tar = None
