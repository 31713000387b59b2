"""`hipt-shards build features`: per-slide tile-feature files (TRIDENT, CLAM, STAMP) -> token-grid shards,
the kind embed_tiles writes, so ViT4K pretraining, embed_regions and slide-level training read them unchanged.

Labels, parts, resuming and skipping as for `hipt-shards build slides`; each slide's regions are written in
raster order, the slide's manifest entry keeps its file's sha256.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hipt_e2e.config import Settings, bound
from hipt_e2e.data.features import Fallbacks, FeatureFormat, GridRegion, SlideFeatures, place_tiles, read_slide_features
from hipt_e2e.data.lineage import TOKEN_GRIDS, Encoder, Geometry, Lineage, Source
from hipt_e2e.data.manifest import GRIDS_KIND
from hipt_e2e.data.samples import encode_grid, sample_key
from hipt_e2e.data.writer import ShardSetWriter, SizedShards
from hipt_e2e.errors import InputError
from hipt_e2e.io import sha256_file
from hipt_e2e.progress import progress
from shards.build import BuildError, build_args, parse_part, part_dir
from shards.inputs import FEATURES, Item, class_names, discover

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureBuildSettings(Settings):
    """`hipt-shards build features`' settings: the files' layout, the region grid, what the files leave out."""

    kind: Literal["features"] = FEATURES
    input: str | None = None
    out: str | None = None
    labels: str | None = None  # CSV slide_id,label[,patient_id][,split]
    labels_from_folders: bool = False
    classes: tuple[str, ...] | None = None
    format: FeatureFormat = "trident"
    grid: int = bound(16, 1)  # tiles per region side: HIPT's 4096 px regions of 256 px tiles
    snap: float = bound(0.0, 0.0, 0.49)  # a tile this far off its slide's tile grid (in tiles) is moved onto it
    encoder: str | None = None  # the files' encoder where they record none (CLAM)
    tile_px: int | None = bound(None, 1)  # tile side in px at mpp, where the files record none (CLAM)
    mpp: float | None = bound(None, 0.0)  # um/px of the tiles, where the files record none (CLAM)
    slide_mpp: float | None = bound(None, 0.0)  # um/px of level 0, where the files record none (CLAM, STAMP)
    dtype: Literal["float16", "float32"] = "float16"  # of the stored grids, as embed_tiles' embed.dtype
    shard_bytes: int | float = bound(1_000_000_000, 1)
    part: str | None = None  # "i/n"
    on_error: Literal["fail", "skip"] = "fail"
    shuffle_seed: int | None = 0  # build order of the slides; null: sorted by slide id

    def fallbacks(self) -> Fallbacks:
        return Fallbacks(self.tile_px, self.mpp, self.slide_mpp, self.encoder)


def _region_sample(item: Item, index: int, region: GridRegion, tiles: SlideFeatures, classes: list[str]) -> dict:
    """A region's sample as embed_tiles writes it: the grid and the region record (height, width: the grid's)."""
    ext, data = encode_grid(region.grid)
    rows, cols = region.tissue.shape
    record = {"slide_id": item.slide_id, "patient_id": item.patient_id or item.slide_id, "label": item.label,
              "label_index": classes.index(item.label) if item.label is not None else None, "split": item.split,
              "region_index": index, "height": rows, "width": cols, "tile_px": tiles.tile_px, "grid": [rows, cols],
              "tissue": [round(float(v), 4) for v in region.tissue.ravel()], "x": region.x, "y": region.y,
              "size": region.size, "mpp": tiles.mpp, "slide_mpp": tiles.slide_mpp, "source": str(item.path),
              "region_height": rows * tiles.tile_px, "region_width": cols * tiles.tile_px}
    return {"__key__": sample_key(item.ordinal, index), ext: data, "json": json.dumps(record).encode()}


def _lineage(settings: FeatureBuildSettings, tiles: SlideFeatures) -> Lineage:
    """Token grids of `grid` x `grid` tiles at the files' resolution; the encoder as the files name it."""
    encoder, width, tile_px, mpp = tiles.geometry()
    architecture = {"encoder": encoder, "embed_dim": width, "features_format": settings.format,
                    "magnification": tiles.magnification}
    return Lineage(TOKEN_GRIDS, Geometry(settings.grid * tile_px, tile_px, tiles.mpp, width),
                   Source(str(Path(settings.input).resolve()), None), Encoder(architecture))


def _reference(items: list[Item], settings: FeatureBuildSettings) -> SlideFeatures:
    """The first readable file in build order (of all parts alike): the set's encoder, width and resolution."""
    for item in sorted(items, key=lambda item: item.ordinal):
        try:
            return read_slide_features(item.path, settings.format, settings.fallbacks())
        except InputError:
            if settings.on_error == "fail":
                raise
    raise BuildError(f"{settings.input}: no readable {settings.format} feature file")


def _regions(item: Item, settings: FeatureBuildSettings, reference: SlideFeatures) -> tuple[SlideFeatures, list]:
    tiles = read_slide_features(item.path, settings.format, settings.fallbacks())
    if tiles.geometry() != reference.geometry():
        raise InputError(item.path, "holds {} features of width {} from {} px tiles at {} um/px; the set's first "
                                    "file holds {} features of width {} from {} px tiles at {} um/px".format(
                                        *tiles.geometry(), *reference.geometry()))
    return tiles, place_tiles(tiles, settings.grid, settings.snap, item.path, settings.dtype)


def _events(todo: list[tuple[Item, int]], settings: FeatureBuildSettings, classes: list[str],
            reference: SlideFeatures) -> Iterator[tuple[Item, str, int, dict]]:
    """("sample", index, sample) or ("skip", 0, record) per item, from its start region on."""
    for item, start in progress(todo, desc=f"build {Path(settings.out).name}", unit="slide"):
        try:
            tiles, regions = _regions(item, settings, reference)
        except InputError as exc:
            if settings.on_error == "fail":
                raise
            log.warning("skipped %s: %s", exc.path, exc.reason)
            yield item, "skip", 0, {"path": exc.path, "reason": exc.reason, "inputs": 1}
            continue
        for index in range(start, len(regions)):
            yield item, "sample", index, _region_sample(item, index, regions[index], tiles, classes)


def build_features(settings: FeatureBuildSettings) -> dict:
    """Run an import (or the rest of an interrupted one) and return its manifest."""
    out_dir = part_dir(Path(settings.out), settings.part)
    shard_set = ShardSetWriter(out_dir, build_args(settings.to_mapping()), noun="build", out_option="--out")
    if (manifest := shard_set.finished()) is not None:
        return manifest
    items = discover(FEATURES, settings.input, labels_csv=settings.labels,
                     labels_from_folders=settings.labels_from_folders, shuffle_seed=settings.shuffle_seed)
    classes = class_names(items, None if settings.classes is None else list(settings.classes))
    part_index, part_count = parse_part(settings.part)
    mine = [item for item in items if item.ordinal % part_count == part_index]
    reference = _reference(items, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = SizedShards(shard_set, int(settings.shard_bytes), shard_set.resume())
    start = writer.resume_position()
    todo = [(item, start[1] if item.ordinal == start[0] else 0) for item in mine
            if start is not None and item.ordinal >= start[0]]
    try:
        for item, event, index, payload in _events(todo, settings, classes, reference):
            if event == "skip":
                writer.skip(payload)
            else:
                writer.add(payload, item.slide_id, (item.ordinal, index))
        records, skipped = writer.finish()
    except BaseException:
        writer.abort()
        raise
    slides = _slide_entries(mine, [record["shard"] for record in records])
    return shard_set.write_manifest(records, GRIDS_KIND, classes, slides, inputs=len(mine), written=len(slides),
                                    skipped=skipped, n_skipped=len(skipped),
                                    lineage=_lineage(settings, reference).as_dict())


def _slide_entries(items: list[Item], shards: list[dict]) -> dict[str, dict]:
    """Each written slide's manifest entry: label, patient, split, regions, and its source file with its sha256."""
    regions: dict[str, int] = {}
    for shard in shards:
        for slide_id, count in shard["slides"].items():
            regions[slide_id] = regions.get(slide_id, 0) + count
    return {item.slide_id: {"label": item.label, "patient_id": item.patient_id or item.slide_id, "split": item.split,
                            "regions": regions[item.slide_id], "source": str(item.path),
                            "source_sha256": sha256_file(item.path)}
            for item in items if item.slide_id in regions}
