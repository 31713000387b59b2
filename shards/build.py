"""`hipt-shards build`: inputs -> WebDataset shards + manifest.json, atomic, resumable, partitionable.

Each item of this part yields "sample" and "skip" events in order; one SizedShards writer packs the samples
into shards and records each closed one with the position to resume from (hipt_e2e.data.writer).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Literal

import numpy as np
import webdataset as wds

from hipt_e2e.config import Settings, bound
from hipt_e2e.data.lineage import pixel_lineage
from hipt_e2e.data.masks import ROI_EXCLUDE, slide_roi, write_qc
from hipt_e2e.data.samples import encode_pixels, sample_key
from hipt_e2e.data.sources import (
    ImageReader,
    InputError,
    OpenSlideReader,
    coords_from_name,
    load_pt_pixels,
    plan_slide,
)
from hipt_e2e.data.tiling import MAX_INK, TISSUE_FLOOR, RegionGeometry, measure_tiles
from hipt_e2e.data.writer import ShardSetWriter, SizedShards
from hipt_e2e.errors import SettingError, UserError
from hipt_e2e.io import atomic_write_text
from hipt_e2e.progress import progress
from shards.inputs import InputKind, Item, class_names, discover

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildSettings(Settings):
    """`hipt-shards build`'s settings (its flags and `key=value` overrides set them)."""

    kind: InputKind | None = None  # what the input folder holds
    input: str | None = None
    out: str | None = None
    labels: str | None = None  # CSV slide_id,label[,patient_id][,split]
    labels_from_folders: bool = False
    classes: tuple[str, ...] | None = None  # explicit class order; default: sorted labels found
    region_px: int = bound(4096, 1)
    tile_px: int = bound(256, 1)
    mpp: float = bound(0.5, 0.0)  # target resolution of the regions
    slide_mpp: float | None = bound(None, 0.0)  # resolution of the inputs when their metadata has none (images, pt) or an implausible one
    allow_upsample: bool = False  # allow reading at an mpp finer than a slide's own by more than 1.25x
    min_tissue: float = bound(0.25, 0.0, 1.0)
    tissue_threshold: int | None = bound(None, 0, 255)  # saturation 0-255; None: Otsu per slide (floored)
    max_ink: float = bound(MAX_INK, 0.0, 1.0)  # most ink (blue, green, black marker) a kept tile or region holds
    min_sharpness: float | None = bound(None, 0.0)  # tiles blurrier than this get tissue 0; None: off (see qc/sharpness.json)
    roi: str | None = None  # folder of QuPath GeoJSON annotations, <slide_id>.geojson, restricting tiling
    roi_exclude: tuple[str, ...] = ROI_EXCLUDE  # annotation classes cut out of the ROI; all others include
    qc: bool = True  # slides: write qc/<slide_id>.png (kept and dropped regions) and .geojson (tissue mask)
    thumbnail_px: int = bound(2048, 1)
    encoding: Literal["jpeg", "png", "npy"] = "jpeg"
    quality: int = bound(95, 0, 100)
    shard_bytes: int | float = bound(1_000_000_000, 1)  # recorded as given (the CLI makes it an int)
    workers: int = bound(1, 1)
    part: str | None = None  # "i/n"
    on_error: Literal["fail", "skip"] = "fail"
    tiles_per_item: int = bound(1024, 1)
    shuffle_seed: int | None = 0  # build order of the items (slides); null: sorted by slide id


# Settings that change no byte of the output; a resumed or merged build may differ in these.
RUN_ONLY_KEYS = ("workers", "part", "on_error", "out", "qc")


SHARPNESS_QUANTILES = (1, 5, 10, 25, 50, 75, 90, 99)  # percent, in the build's qc/sharpness.json


class BuildError(UserError):
    pass


def parse_part(part: str | None) -> tuple[int, int]:
    if part is None:
        return 0, 1
    try:
        index, count = (int(v) for v in str(part).split("/"))
    except ValueError as exc:
        raise SettingError(f"--part must look like i/n (e.g. 0/4), got {part!r}") from exc
    if not 0 <= index < count:
        raise SettingError(f"--part {part}: need 0 <= i < n")
    return index, count


def part_dir(out: Path, part: str | None) -> Path:
    if part is None:
        return out
    index, count = parse_part(part)
    return out / f"part-{index:04d}-of-{count:04d}"


def build_args(settings: Mapping[str, Any]) -> dict:
    """The settings a build's bytes depend on (a manifest's build_args, compared on resume and merge)."""
    return {k: v for k, v in settings.items() if k not in RUN_ONLY_KEYS}


# --------------------------------------------------------------------------------------------- items
def _sample(item: Item, index: int, rgb: np.ndarray, tiles: Mapping[str, np.ndarray], settings: BuildSettings,
            classes: list[str], slide_id: str | None, **fields: Any) -> dict:
    """One region's sample; `tiles`: its per-tile tissue, ink and sharpness [rows, cols]."""
    ext, data = encode_pixels(rgb, settings.encoding, settings.quality)
    record = {"slide_id": slide_id, "patient_id": item.patient_id or item.slide_id, "label": item.label,
              "label_index": classes.index(item.label) if item.label is not None else None, "split": item.split,
              "region_index": index, "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
              "tile_px": settings.tile_px, "grid": list(tiles["tissue"].shape),
              **{name: [round(float(v), 1 if name == "sharpness" else 4) for v in values.ravel()]
                 for name, values in tiles.items()}, **fields}
    return {"__key__": sample_key(item.ordinal, index), ext: data, "json": json.dumps(record).encode()}


def _skip(index: int, path: object, reason: str) -> tuple:
    return "skip", index, {"path": str(path), "reason": reason, "inputs": 1}


def _pt_events(item: Item, settings: BuildSettings, classes: list[str], start: int) -> Iterator[tuple]:
    threshold = settings.tissue_threshold if settings.tissue_threshold is not None else TISSUE_FLOOR
    for index, path in enumerate(item.files[start:], start):
        try:
            rgb = load_pt_pixels(path)
            tiles = measure_tiles(rgb, settings.tile_px, threshold, settings.mpp, settings.max_ink,
                                  settings.min_sharpness)
        except (InputError, ValueError) as exc:
            yield _skip(index, path, exc.reason if isinstance(exc, InputError) else str(exc))
            continue
        x, y = coords_from_name(path)
        slide_id = item.slide_id if item.slide_id is not None else path.stem
        yield "sample", index, _sample(item, index, rgb, tiles, settings, classes, slide_id, x=x, y=y,
                                       size=int(rgb.shape[1]), mpp=settings.mpp, slide_mpp=settings.slide_mpp,
                                       source=str(path))


def _slide_events(item: Item, settings: BuildSettings, classes: list[str], start: int) -> Iterator[tuple]:
    geometry = RegionGeometry(settings.region_px, settings.tile_px, settings.mpp)
    try:
        reader = (ImageReader(item.path, settings.slide_mpp) if settings.kind == "images"
                  else OpenSlideReader(item.path, settings.slide_mpp))
    except InputError as exc:
        yield _skip(0, exc.path, exc.reason)
        return
    count = 0
    try:
        roi = None if settings.roi is None else slide_roi(Path(settings.roi), item.slide_id, settings.roi_exclude)
        plan = plan_slide(reader, geometry, min_tissue=settings.min_tissue, threshold=settings.tissue_threshold,
                          max_ink=settings.max_ink, min_sharpness=settings.min_sharpness, roi=roi,
                          thumbnail_px=settings.thumbnail_px,
                          allow_upsample=settings.allow_upsample)
        if settings.qc:
            write_qc(plan, part_dir(Path(settings.out), settings.part) / "qc", item.slide_id)
        for region in plan.regions(reader, start):
            count += 1
            yield "sample", region.index, _sample(
                item, region.index, region.rgb,
                {"tissue": region.tissue, "ink": region.ink, "sharpness": region.sharpness}, settings, classes,
                item.slide_id, x=region.x, y=region.y, size=region.size, mpp=settings.mpp, slide_mpp=reader.mpp,
                tissue_threshold=region.threshold, source=str(item.path))
    except InputError as exc:
        yield _skip(start + count, exc.path, exc.reason)
        return
    except Exception as exc:  # a corrupt tile deep inside a slide file
        yield _skip(start + count, item.path,
                    f"read failed after {start + count} regions ({type(exc).__name__}: {exc})")
        return
    finally:
        reader.close()
    if start == 0 and count == 0:
        yield _skip(0, item.path, f"no region with tissue fraction >= {settings.min_tissue}")


def item_events(item: Item, settings: BuildSettings, classes: list[str], start: int = 0) -> Iterator[tuple]:
    """("sample", index, sample) and ("skip", index, record) events of one item, in order."""
    return (_pt_events if settings.kind == "pt" else _slide_events)(item, settings, classes, start)


def _spool_item(item: Item, settings: BuildSettings, classes: list[str], start: int, spool: str) -> list[tuple]:
    """Worker side of a parallel build: samples go to a temporary tar, events come back in order."""
    events = []
    with open(spool, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0) as tar:
        for kind, index, payload in item_events(item, settings, classes, start):
            if kind == "sample":
                tar.write(payload)
                payload = None
            events.append((kind, index, payload))
    return events


def _replay(events: list[tuple], spool: str) -> Iterator[tuple]:
    samples = iter(wds.tariterators.tarfile_samples([{"url": spool}]))
    for kind, index, payload in events:
        if kind == "sample":
            payload = {k: v for k, v in next(samples).items() if k != "__url__"}
        yield kind, index, payload
    os.unlink(spool)


def _events_parallel(items: list[tuple[Item, int]], settings: BuildSettings, classes: list[str], spool_dir: Path
                     ) -> Iterator[tuple[Item, Iterator[tuple]]]:
    """Items built by `workers` processes, yielded in input order; a window of 2 x workers items caps disk use."""
    with ProcessPoolExecutor(settings.workers, mp_context=get_context("spawn")) as pool:
        def submit(item: Item, start: int) -> tuple[Item, str, Future]:
            spool = str(spool_dir / f"item-{item.ordinal:07d}.tar")
            return item, spool, pool.submit(_spool_item, item, settings, classes, start, spool)

        todo = iter(items)
        pending = deque(submit(*entry) for entry in islice(todo, 2 * settings.workers))
        while pending:
            item, spool, future = pending.popleft()
            yield item, _replay(future.result(), spool)
            pending.extend(submit(*entry) for entry in islice(todo, 1))


# --------------------------------------------------------------------------------------------- build
def build(settings: BuildSettings) -> dict:
    """Run a build (or the rest of an interrupted one) and return its manifest."""
    out_dir = part_dir(Path(settings.out), settings.part)
    recorded = settings.to_mapping()
    shard_set = ShardSetWriter(out_dir, build_args(recorded), noun="build", out_option="--out")
    if (manifest := shard_set.finished()) is not None:
        return manifest

    items = discover(settings.kind, settings.input, labels_csv=settings.labels,
                     labels_from_folders=settings.labels_from_folders, tiles_per_item=settings.tiles_per_item,
                     shuffle_seed=settings.shuffle_seed)
    classes = class_names(items, None if settings.classes is None else list(settings.classes))
    part_index, part_count = parse_part(settings.part)
    mine = [item for item in items if item.ordinal % part_count == part_index]

    out_dir.mkdir(parents=True, exist_ok=True)  # once the inputs are found: a refused build leaves no folder
    writer = SizedShards(shard_set, int(settings.shard_bytes), shard_set.resume())
    start = writer.resume_position()
    if writer.records:
        log.info("resuming %s after %d shard(s) at %s", out_dir, len(writer.records),
                 "the end" if start is None else "item {}, sample {}".format(*start))
    todo = [(item, start[1] if item.ordinal == start[0] else 0) for item in mine
            if start is not None and item.ordinal >= start[0]]
    records, skipped = _write(writer, todo, settings, classes)
    if settings.qc:
        report = sharpness_report(out_dir, [record["shard"] for record in records])
        atomic_write_text(out_dir / "qc" / "sharpness.json", json.dumps(report, indent=1))
        log.info("sharpness of %d tissue tiles: quantiles %s (qc/sharpness.json)", report["tiles"], report["quantiles"])
    slides, accounting = _accounting(settings, mine, [record["shard"] for record in records], skipped)
    manifest = shard_set.write_manifest(records, settings.kind, classes, slides, lineage=pixel_lineage(recorded).as_dict(),
                                        **accounting)
    log.info("%d inputs = %d written + %d skipped; %d samples in %d shards -> %s", manifest["inputs"],
             manifest["written"], manifest["n_skipped"], manifest["samples"], len(records), out_dir)
    return manifest


def _write(writer: SizedShards, todo: list[tuple[Item, int]], settings: BuildSettings, classes: list[str]
           ) -> tuple[list[dict], list[dict]]:
    """The samples of the items (from their start) into shards; returns every shard's record and skip."""
    spool_dir = Path(tempfile.mkdtemp(prefix=".spool-", dir=writer.shard_set.out))
    try:
        if settings.workers > 1:
            streams = _events_parallel(todo, settings, classes, spool_dir)
        else:
            streams = ((item, item_events(item, settings, classes, start)) for item, start in todo)
        for item, events in progress(streams, total=len(todo), desc=f"build {writer.shard_set.out.name}", unit="item"):
            for kind, index, payload in events:
                if kind == "skip":
                    if settings.on_error == "fail":
                        raise BuildError(f"{payload['path']}: {payload['reason']}")
                    log.warning("skipped %s: %s", payload["path"], payload["reason"])
                    writer.skip(payload)
                else:
                    writer.add(payload, item.slide_id, (item.ordinal, index))
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)


def sharpness_report(out_dir: Path, shards: list[dict]) -> dict:
    """The distribution of sharpness over the tiles with tissue (>= 0.5) of a build's shards, overall and per
    slide's median, read from the records (a resumed build's earlier shards count too): --min-sharpness is chosen
    from it; tiles --min-sharpness dropped have tissue 0 and are not in it."""
    per_slide: dict[str, list[float]] = {}
    for shard in shards:
        with tarfile.open(out_dir / shard["name"]) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    record = json.loads(tar.extractfile(member).read())
                    per_slide.setdefault(str(record["slide_id"]), []).extend(
                        score for score, tissue in zip(record.get("sharpness", []), record["tissue"]) if tissue >= 0.5)
    scores = [score for values in per_slide.values() for score in values]
    quantiles = {str(q): round(float(np.percentile(scores, q)), 1) for q in SHARPNESS_QUANTILES} if scores else {}
    return {"tiles": len(scores), "quantiles": quantiles,
            "slide_medians": {slide: round(float(np.median(v)), 1) for slide, v in per_slide.items() if v}}


def _accounting(settings: BuildSettings, items: list[Item], shards: list[dict], skipped: list[dict]) -> tuple[dict, dict]:
    """The manifest's slides (what each holds) and accounting of a build's shards: inputs = written +
    the inputs the skipped records stand for."""
    by_slide = {item.slide_id: item for item in items if item.slide_id is not None}
    slides: dict[str, dict] = {}
    for shard in shards:
        for slide_id, count in shard["slides"].items():
            item = by_slide[slide_id]
            entry = slides.setdefault(slide_id, {"label": item.label, "patient_id": item.patient_id or slide_id,
                                                 "split": item.split, "regions": 0})
            entry["regions"] += count
    samples = sum(shard["samples"] for shard in shards)
    inputs = sum(item.n_inputs for item in items)
    written = samples if settings.kind == "pt" else len(slides)
    n_skipped = sum(record["inputs"] for record in skipped)
    if inputs != written + n_skipped:
        raise RuntimeError(f"accounting error: {inputs} inputs != {written} written + {n_skipped} skipped")
    return slides, {"inputs": inputs, "written": written, "skipped": skipped, "n_skipped": n_skipped}
