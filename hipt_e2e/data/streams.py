"""Streaming readers over shards, built on webdataset: regions, tiles, and slide bags.

Each epoch the shard list is shuffled with (seed, epoch), identically on every process, and shard i goes to
reader i mod (ranks x DataLoader workers): every sample is seen once per epoch. `balanced=True` instead
resamples shards forever, keeping a sample of class c with probability min_count / count_c. A slide bag
is read by the owner of the shard where the slide starts, following it into the next shards.
"""
from __future__ import annotations

import json
import random
import zlib
from collections.abc import Iterator, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset

from hipt_e2e.data.manifest import load_manifest, shard_urls
from hipt_e2e.data.samples import decode_sample, stack_pixels
from hipt_e2e.data.storage import tar_samples
from hipt_e2e.data.tiling import cut_tiles
from hipt_e2e.errors import UserError


def reader_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(index, count) of this reader among all ranks x DataLoader workers."""
    env_rank, env_world, worker, workers = wds.utils.pytorch_worker_info()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    return rank * workers + worker, world_size * workers


def _label_of(sample: dict) -> str | None:
    return json.loads(sample["json"]).get("label")


class _ShardStream(IterableDataset):
    """Shared plumbing: shard assignment per epoch, resampling, shuffle buffer, class balancing."""

    def __init__(self, source: str | Path | Sequence[str], *, shuffle: int = 0, seed: int = 0,
                 balanced: bool = False, rank: int | None = None, world_size: int | None = None):
        super().__init__()
        self.urls = shard_urls(source)
        self.manifest = None if isinstance(source, (list, tuple)) else load_manifest(source)
        self.shuffle, self.seed, self.balanced = shuffle, seed, balanced
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        if balanced and self.manifest is None:
            raise UserError("balanced sampling needs a shard directory with a manifest (class counts)")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, salt: int = 0) -> random.Random:
        reader, _ = reader_info(self.rank, self.world_size)
        return random.Random((self.seed * 1_000_003 + self.epoch) * 1_009 + reader * 7 + salt)

    def _my_shards(self) -> list[tuple[int, str]]:
        """(build position, url) of the shards this reader owns this epoch."""
        reader, readers = reader_info(self.rank, self.world_size)
        order = list(enumerate(self.urls))
        if self.shuffle > 0:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order[reader::readers]

    def raw_samples(self) -> Iterator[dict]:
        """Raw samples (bytes) of this reader, in shard order."""
        if self.balanced:
            yield from self._balanced(self.manifest["class_counts"]["regions"], _label_of, tar_samples)
            return
        for _, url in self._my_shards():
            yield from tar_samples(url)

    def _balanced(self, counts: dict[str, int], label_of, read) -> Iterator[Any]:
        keep = {label: min(counts.values()) / count for label, count in counts.items()}
        rng = self._rng(salt=1)
        while True:
            for unit in read(rng.choice(self.urls)):
                if rng.random() < keep.get(label_of(unit), 0.0):
                    yield unit

    def _shuffled(self, items: Iterator[Any], salt: int) -> Iterator[Any]:
        if self.shuffle <= 1:
            return items
        return wds.filters._shuffle(items, bufsize=self.shuffle, initial=self.shuffle, rng=self._rng(salt))


def _region(sample: dict, decode: str = "cpu") -> dict:
    pixels, record = decode_sample(sample, decode)
    return {"pixels": pixels, "record": record}


class RegionStream(_ShardStream):
    """One item per region: {"pixels": uint8 [3, H, W] (a token grid: float [C, rows, cols]; decode="gpu": a
    JpegBatch), "record": the sample's JSON record}."""

    def __init__(self, source: str | Path | Sequence[str], *, decode: str = "cpu", **kwargs: Any):
        super().__init__(source, **kwargs)
        self.decode = decode

    def __iter__(self) -> Iterator[dict]:
        for sample in self._shuffled(self.raw_samples(), salt=2):
            yield _region(sample, self.decode)


# region record fields with one value per tile; a tile's record holds its own value (tissue as tissue_fraction)
PER_TILE = ("tissue", "ink", "sharpness")


class TileStream(_ShardStream):
    """One item per tile with at least `min_tissue`, raster order: {"pixels": uint8 [3, tile, tile], "record":
    the region's record with "tile_index", "row", "col", "tissue_fraction" and the tile's "ink" and
    "sharpness" where the record has them}. The shuffle buffer mixes tiles, not
    regions: tiles of one region are strongly correlated."""

    def __init__(self, source: str | Path | Sequence[str], *, min_tissue: float = 0.0, **kwargs: Any):
        super().__init__(source, **kwargs)
        self.min_tissue = min_tissue

    def _tiles(self) -> Iterator[dict]:
        for sample in self.raw_samples():
            pixels, record = decode_sample(sample)
            cols, region = record["grid"][1], {k: v for k, v in record.items() if k not in PER_TILE}
            measures = [k for k in PER_TILE[1:] if k in record]  # records written before issue 30 have none
            for index, (tile, fraction) in enumerate(zip(cut_tiles(pixels, record["tile_px"]), record["tissue"], strict=True)):
                if fraction >= self.min_tissue:
                    yield {"pixels": tile.contiguous(), "record": {**region, "tile_index": index, "row": index // cols,
                                                                   "col": index % cols, "tissue_fraction": fraction,
                                                                   **{k: record[k][index] for k in measures}}}

    def __iter__(self) -> Iterator[dict]:
        return self._shuffled(self._tiles(), salt=3)


def count_tiles(source: str | Path, min_tissue: float) -> int:
    """Tiles a TileStream yields per pass over a shard set (reads the records, not the pixels)."""
    total = 0
    for url in shard_urls(source):
        for sample in tar_samples(url):
            total += sum(fraction >= min_tissue for fraction in json.loads(sample["json"])["tissue"])
    return total


class SlideBagStream(_ShardStream):
    """One item per slide, all its regions or `regions_per_slide` drawn (seeded; only those decoded):
    {"slide_id", "patient_id", "label", "label_index", "pixels": uint8 [k, 3, H, W] (decode="gpu": a JpegBatch),
    "coords": int64 [k, 2] (level-0 x, y), "sizes": int64 [k] (level-0 side), -1 where unknown,
    "region_index": int64 [k], "tissue": float32 [k, rows, cols]}."""

    def __init__(self, source: str | Path, *, regions_per_slide: int | None = None, decode: str = "cpu",
                 **kwargs: Any):
        if isinstance(source, (list, tuple)):
            raise UserError("slide bags need a shard directory with a manifest (slides may span shards)")
        super().__init__(source, **kwargs)
        self.regions_per_slide, self.decode = regions_per_slide, decode
        self.continues = [shard["slide_continues"] for shard in self.manifest["shards"]]

    def _bags_of_shard(self, position: int) -> Iterator[list[dict]]:
        """Raw bags of slides that start in shard `position`, following the last one into later shards."""
        groups = groupby(tar_samples(self.urls[position]), key=lambda s: json.loads(s["json"])["slide_id"])
        bags = [(slide_id, list(samples)) for slide_id, samples in groups]
        if bags and json.loads(bags[0][1][0]["json"])["region_index"] != 0:
            bags = bags[1:]  # that slide started in an earlier shard; its owner reads it
        if not bags:
            return
        following = position
        while self.continues[following] and following + 1 < len(self.urls):
            following += 1
            tail = [s for s in tar_samples(self.urls[following]) if json.loads(s["json"])["slide_id"] == bags[-1][0]]
            bags[-1][1].extend(tail)
            if len(tail) < self.manifest["shards"][following]["samples"]:
                break  # the slide ended inside this shard
        for _, samples in bags:
            yield samples

    def _raw_bags(self) -> Iterator[list[dict]]:
        if self.balanced:
            yield from self._balanced(self.manifest["class_counts"]["slides"],
                                      lambda bag: _label_of(bag[0]),
                                      lambda url: self._bags_of_shard(self.urls.index(url)))
            return
        for position, _ in self._my_shards():
            yield from self._bags_of_shard(position)

    def sample_indices(self, slide_id: str, count: int) -> list[int]:
        """The regions drawn for a slide this epoch: deterministic in (seed, epoch, slide id)."""
        if self.regions_per_slide is None or count <= self.regions_per_slide:
            return list(range(count))
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(slide_id.encode())])
        return sorted(rng.choice(count, self.regions_per_slide, replace=False).tolist())

    def __iter__(self) -> Iterator[dict]:
        for bag in self._shuffled(self._raw_bags(), salt=4):
            yield self.decode_bag(bag)

    def decode_bag(self, bag: list[dict]) -> dict:
        first = json.loads(bag[0]["json"])
        chosen = [_region(bag[i], self.decode) for i in self.sample_indices(first["slide_id"], len(bag))]
        shapes = {tuple(region["pixels"].shape) for region in chosen}
        if len(shapes) > 1:
            raise UserError(f"slide {first['slide_id']}: regions differ in size {sorted(shapes)}; "
                             "rebuild its shards with one region size")
        records = [region["record"] for region in chosen]
        return {
            "slide_id": first["slide_id"], "patient_id": first.get("patient_id"), "label": first["label"],
            "label_index": first["label_index"],
            "pixels": stack_pixels([region["pixels"] for region in chosen]),
            "coords": torch.tensor([[r["x"] if r["x"] is not None else -1, r["y"] if r["y"] is not None else -1]
                                    for r in records], dtype=torch.int64),
            "sizes": torch.tensor([r.get("size") or -1 for r in records], dtype=torch.int64),
            "region_index": torch.tensor([r["region_index"] for r in records], dtype=torch.int64),
            "tissue": torch.tensor([r["tissue"] for r in records], dtype=torch.float32).view(
                len(records), *records[0]["grid"]),
        }
