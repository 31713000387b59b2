"""Random access to the regions of a region-shard set, by (slide id, region positions), for end-to-end
training's seeded slide order: one range read per region through the shard index (hipt_e2e.data.index),
through a bounded local cache when remote. Items are SlideBagStream's, drawn and decoded by it, so both
readers agree exactly.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from hipt_e2e.data.index import ShardIndex, open_index
from hipt_e2e.data.manifest import GRIDS_KIND, load_manifest, shard_urls
from hipt_e2e.data.slides import Level, SlideInfo, units
from hipt_e2e.data.storage import local_path, read_bytes
from hipt_e2e.data.streams import SlideBagStream
from hipt_e2e.errors import UserError


class RegionCache:
    """Region bytes of remote shards in a local folder, at most `max_bytes` (oldest written go first). Entries,
    named by a hash of (shard URL, byte range), are written atomically (processes share the folder) and
    CRC-checked on use by the caller."""

    def __init__(self, folder: str | Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = Path(folder), int(max_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.held = sum(path.stat().st_size for path in self.folder.glob("*.bin"))

    def _path(self, url: str, start: int, end: int) -> Path:
        return self.folder / (hashlib.sha256(f"{url}\0{start}\0{end}".encode()).hexdigest()[:32] + ".bin")

    def get(self, url: str, start: int, end: int) -> bytes | None:
        try:
            return self._path(url, start, end).read_bytes()
        except FileNotFoundError:
            return None

    def drop(self, url: str, start: int, end: int) -> None:
        self._path(url, start, end).unlink(missing_ok=True)

    def put(self, url: str, start: int, end: int, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        if self.held + len(data) > self.max_bytes:
            self._evict(self.max_bytes - len(data))
        path = self._path(url, start, end)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_bytes(data)
        os.replace(temporary, path)
        self.held += len(data)

    def _evict(self, target: int) -> None:
        entries = sorted(((p.stat().st_mtime, p) for p in self.folder.glob("*.bin")), key=lambda e: e[0])
        self.held = sum(p.stat().st_size for _, p in entries)
        for _, path in entries:
            if self.held <= target:
                break
            self.held -= path.stat().st_size
            path.unlink(missing_ok=True)


class ShardRegions(Dataset):
    """Regions of a region-shard set (a folder or URL) by (unit id, region positions); see the module. A unit
    is a slide, or at level=patient a patient: its slides' regions one after the other (data.slides.units)."""

    def __init__(self, source: str | Path, *, regions_per_slide: int | None, seed: int, decode: str = "cpu",
                 cache_dir: str | Path | None = None, cache_bytes: int = 0, level: Level = "slide") -> None:
        self.manifest = load_manifest(source)
        if self.manifest.get("kind") == GRIDS_KIND:
            raise UserError(f"{source} holds token grids; end-to-end training reads region shards (pixels)")
        self.sampler = SlideBagStream(self.manifest, regions_per_slide=regions_per_slide, seed=seed)
        self.decoder = SlideBagStream(self.manifest, decode=decode)  # decodes whatever regions it is given
        self.urls = shard_urls(self.manifest)
        self.index = open_index(self.manifest)
        remote = local_path(self.manifest["root"]) is None
        self.cache = RegionCache(cache_dir, cache_bytes) if cache_dir and cache_bytes and remote else None
        rows = self._rows_per_slide(self.index)
        wrong = {s: (len(rows.get(s, [])), e["regions"]) for s, e in self.manifest["slides"].items()
                 if len(rows.get(s, [])) != e["regions"]}
        if wrong:
            raise UserError(f"{source}: regions in the index differ from the manifest (found, listed): {wrong}")
        slides = [SlideInfo(slide, entry["label"], entry["patient_id"], entry["split"])
                  for slide, entry in self.manifest["slides"].items()]
        self.units = units(slides, level, source)
        none = np.zeros(0, dtype=np.intp)  # a listed slide without regions
        # unit id -> its index rows, slide after slide; in id order, as the index lists slides
        self.slides = {unit.slide_id: np.concatenate([rows.get(s, none) for s in members])
                       for unit, members in sorted(self.units.items(), key=lambda u: u[0].slide_id)}

    @staticmethod
    def _rows_per_slide(index: ShardIndex) -> dict[str, np.ndarray]:
        """slide id -> its index rows in region order, as SlideBagStream sees a slide's bag."""
        order = np.lexsort((index.region_index, index.slide))
        order = order[index.slide[order] >= 0]
        codes = index.slide[order]
        starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
        return {str(index.slide_ids[codes[start]]): rows
                for start, rows in zip(starts, np.split(order, starts[1:]))}

    def infos(self) -> list[SlideInfo]:
        return list(self.units)

    def sample(self, slide_id: str, epoch: int) -> tuple[str, tuple[int, ...]]:
        """A training item's key: the slide's regions drawn for this epoch."""
        self.sampler.set_epoch(epoch)
        return slide_id, tuple(self.sampler.sample_indices(slide_id, len(self.slides[slide_id])))

    def chunks(self, slide_id: str, size: int) -> list[tuple[str, tuple[int, ...]]]:
        """Keys covering every region of a slide, `size` regions each."""
        count = len(self.slides[slide_id])
        return [(slide_id, tuple(range(start, min(count, start + size)))) for start in range(0, count, size)]

    def read(self, row: int) -> dict[str, bytes]:
        """The raw sample (ext -> bytes) of index row `row`: one range read, or the cache's copy."""
        url = self.urls[self.index.shard[row]]
        start, end = self.index.member_range(row)
        if self.cache is not None and (data := self.cache.get(url, start, end)) is not None:
            try:
                return self.index.read_sample(row, data, start, url)
            except OSError:
                self.cache.drop(url, start, end)  # a damaged cache entry: fetch it again
        data = read_bytes(url, start, end - start)
        sample = self.index.read_sample(row, data, start, url)
        if self.cache is not None:
            self.cache.put(url, start, end, data)
        return sample

    def __getitem__(self, key: tuple[str, Sequence[int]]) -> dict:
        unit_id, positions = key
        rows = self.slides[unit_id]
        # the unit's id, not its first region's slide: a patient's chunks stay one unit (e2e.slide_probabilities)
        bag = self.decoder.decode_bag([self.read(int(rows[position])) for position in positions])
        return {**bag, "slide_id": unit_id}
