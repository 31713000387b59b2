"""Slide-level embedding shards: one sample per slide, `features.npy` (float [M, D]), `coords.npy` (int64
[M, 2], level-0 x/y, -1 when unknown) and `json`. Bags are small, so slide-level training loads them all.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hipt_e2e.data.manifest import load_manifest, shard_urls
from hipt_e2e.data.samples import npy_array, npy_bytes, sample_key
from hipt_e2e.data.slides import Level, SlideInfo, units
from hipt_e2e.data.storage import tar_samples
from hipt_e2e.data.writer import ShardSetWriter, SizedShards
from hipt_e2e.errors import UserError

KIND = "slide_embeddings"


@dataclass
class SlideBag:
    slide_id: str
    patient_id: str
    label: str | None
    features: torch.Tensor  # [M, D]
    coords: torch.Tensor  # [M, 2]
    split: str | None = None
    regions: int | None = None  # the input regions it holds when its rows are tiles (embed_regions level=tile)

    @property
    def info(self) -> SlideInfo:
        return SlideInfo(self.slide_id, self.label, self.patient_id, self.split)


def unit_bags(bags: Sequence[SlideBag], level: Level, where: object) -> list[SlideBag]:
    """The bags of `level`'s units (data.slides.units): the slides' own, or one per patient holding the regions
    of its slides concatenated in slide order."""
    if level == "slide":
        return list(bags)
    by_id = {bag.slide_id: bag for bag in bags}
    return [SlideBag(unit.slide_id, unit.patient_id, unit.label, torch.cat([by_id[s].features for s in slides]),
                     torch.cat([by_id[s].coords for s in slides]), unit.split)
            for unit, slides in units([bag.info for bag in bags], level, where).items()]


def bag_sample(bag: SlideBag, ordinal: int, classes: Sequence[str], dtype: np.dtype) -> dict:
    """The shard sample of one slide's bag; `ordinal` (the slide's place in its set) makes the key."""
    record = {"slide_id": bag.slide_id, "patient_id": bag.patient_id, "label": bag.label,
              "label_index": classes.index(bag.label) if bag.label in classes else None, "split": bag.split,
              "n_regions": int(bag.features.shape[0]), "dim": int(bag.features.shape[1])}
    return {"__key__": sample_key(ordinal, 0),
            "features.npy": npy_bytes(bag.features.float().numpy().astype(dtype)),
            "coords.npy": npy_bytes(bag.coords.numpy().astype(np.int64)),
            "json": json.dumps(record).encode()}


def write_slide_bags(out_dir: str | Path, bags: Iterable[SlideBag], classes: Sequence[str], *,
                     build_args: dict, dtype: str = "float32", shard_bytes: int = 500_000_000,
                     lineage: Mapping | None = None) -> dict:
    """Write bags as shards + manifest.json (over what an earlier call wrote there); returns the manifest."""
    shard_set = ShardSetWriter(out_dir, build_args)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    shard_set.restart()  # the bags are the caller's, not made from build_args: nothing to resume or guard
    writer = SizedShards(shard_set, shard_bytes, {})
    slides: dict[str, dict] = {}
    try:
        for ordinal, bag in enumerate(bags):
            writer.add(bag_sample(bag, ordinal, classes, np.dtype(dtype)), bag.slide_id, (ordinal, 0))
            slides[bag.slide_id] = {"label": bag.label, "patient_id": bag.patient_id, "split": bag.split,
                                    "regions": bag.regions or int(bag.features.shape[0])}
        records, _ = writer.finish()
    except BaseException:
        writer.abort()
        raise
    return shard_set.write_manifest(records, KIND, classes, slides, inputs=len(slides), written=len(slides),
                                    lineage=lineage)


def read_slide_bags(source: str | Path) -> tuple[list[SlideBag], list[str]]:
    """All bags of a slide-embedding shard set, and its class list."""
    manifest = load_manifest(source)
    if manifest["kind"] != KIND:
        raise UserError(f"{source}: holds {manifest['kind']!r} shards, expected slide embeddings "
                         "(the output of recipes/embed_regions.py)")
    bags = [decode_bag(sample) for url in shard_urls(source) for sample in tar_samples(url)]
    return bags, manifest["classes"]


def decode_bag(sample: dict) -> SlideBag:
    """One raw slide-embedding sample -> SlideBag (float32 features), checked against its record."""
    record = json.loads(sample["json"])
    features, coords = npy_array(sample["features.npy"]), npy_array(sample["coords.npy"])
    shape = (record["n_regions"], record["dim"])
    if features.dtype.kind != "f" or features.shape != shape or coords.shape != (shape[0], 2):
        raise ValueError(f"features {features.dtype} {features.shape} / coords {coords.shape} do not match the "
                         f"record ({shape[0]} regions of {shape[1]})")
    if not np.isfinite(features).all():
        raise ValueError("features hold NaN or Inf")
    return SlideBag(record["slide_id"], record["patient_id"], record["label"],
                    torch.from_numpy(features.astype(np.float32)), torch.from_numpy(coords), record.get("split"))
