"""The embedding steps of the staged path, each shard set in -> shard set out.

embed_tiles: regions -> token grids [D, rows, cols], one sample per region. embed_regions: a slide's token
grids -> its region embeddings [M, D'] (hipt_e2e.data.embeddings' format) or, without a region encoder,
the bag of all its tile embeddings. Both go by input units (shards a slide spans stay together), unit i
to reader i mod n; each unit becomes one output shard (UnitShards), so output does not depend on the
number of readers and a killed run resumes where it stopped. embed_slides: a slide's tiles -> a pretrained
slide encoder's embedding (one vector a slide: a small set, written at once).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from hipt_e2e.config import Settings, bound, save_config, section
from hipt_e2e.data.embeddings import KIND as BAG_KIND
from hipt_e2e.data.embeddings import SlideBag, bag_sample, write_slide_bags
from hipt_e2e.data.features import tile_bag, tile_step
from hipt_e2e.data.lineage import (
    REGION_EMBEDDINGS,
    SLIDE_EMBEDDINGS,
    TILE_EMBEDDINGS,
    TOKEN_GRIDS,
    Encoder,
    Lineage,
    source_of,
)
from hipt_e2e.data.manifest import GRIDS_KIND, MANIFEST, load_manifest, shard_urls
from hipt_e2e.data.samples import collate, decode_mode, decode_sample, device_pixels, encode_grid
from hipt_e2e.data.storage import StorageSettings, tar_samples
from hipt_e2e.data.streams import SlideBagStream, reader_info
from hipt_e2e.data.writer import ShardSetWriter, UnitShards
from hipt_e2e.errors import InputError
from hipt_e2e.lineage import check_card, read_lineage
from hipt_e2e.models import select_attention, token_grids
from hipt_e2e.models.encoders import RegionModelWithWeights, TileModelWithWeights
from hipt_e2e.models.slide_encoders import SlideEncoderEntry
from hipt_e2e.progress import progress
from hipt_e2e.runtime import Precision, make_accelerator

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class EmbeddingData(StorageSettings):
    """The `data` section of both embedding recipes."""
    shards: str | None = None  # embed_tiles: region shards (hipt-shards build); embed_regions: an embed_tiles output
    workers: int = bound(2, 0)  # DataLoader workers per process


@dataclass(frozen=True)
class EmbedTilesData(EmbeddingData):
    """embed_tiles' `data` section: the regions' reading too."""
    decode: Literal["cpu", "gpu"] = "cpu"  # cpu (readers) | gpu (nvJPEG, batched)


@dataclass(frozen=True)
class TileEmbedding(Settings):
    """embed_tiles' `embed` section."""
    # the released HIPT weights' (x/127.5 - 1); use what your weights were trained with (a pretrained
    # encoder of the registry always takes its own)
    normalisation: str = "hipt"
    regions_per_batch: int = bound(4, 1)
    tiles_per_call: int = bound(512, 1)
    dtype: Literal["float16", "float32"] = "float16"  # of the stored grids
    # no | bf16 | fp16; null: as `accelerate launch` says, else a pretrained entry's own on a GPU (fp32 on a CPU)
    mixed_precision: Precision = None


@dataclass(frozen=True)
class RegionEmbedding(Settings):
    """embed_regions' `embed` section."""
    regions_per_batch: int = bound(64, 1)
    mixed_precision: Precision = None  # no | bf16 | fp16; null: as `accelerate launch` says
    # region: ViT4K embeddings, the HIPT path | tile: every tile embedding of the slide, no region stage (the
    # bags of attention-MIL over tiles, the field's baseline)
    level: Literal["region", "tile"] = "region"
    min_tile_tissue: float = bound(0.0, 0.0, 1.0)  # level tile: drop tiles with less tissue (glass)


@dataclass(frozen=True)
class SlideEncoderModel(Settings):
    """embed_slides' `model` section."""
    slide_encoder: str | None = None  # a name of hipt_e2e.models.slide_encoders.SLIDE_ENCODERS
    weights: str | None = None  # its authors' file (or the Hugging Face snapshot folder holding it)


@dataclass(frozen=True)
class SlideEmbedding(Settings):
    """embed_slides' `embed` section."""
    # tiles with less tissue are left out: the places a features tool did not extract (tissue 0), and glass
    min_tile_tissue: float = bound(1e-3, 0.0, 1.0)


@dataclass(frozen=True)
class EmbeddingSettings(Settings):
    """What both embedding recipes' settings hold besides their model and embed sections."""
    out: str | None = None
    data: EmbeddingData = section(EmbeddingData)


@dataclass(frozen=True)
class EmbedTilesSettings(EmbeddingSettings):
    """recipes/embed_tiles.py: regions -> token grids."""
    data: EmbedTilesData = section(EmbedTilesData)
    model: TileModelWithWeights = section(TileModelWithWeights)
    embed: TileEmbedding = section(TileEmbedding)


@dataclass(frozen=True)
class EmbedRegionsSettings(EmbeddingSettings):
    """recipes/embed_regions.py: token grids -> region embeddings (or tile bags), grouped per slide."""
    model: RegionModelWithWeights = section(RegionModelWithWeights)
    embed: RegionEmbedding = section(RegionEmbedding)


@dataclass(frozen=True)
class EmbedSlidesSettings(EmbeddingSettings):
    """recipes/embed_slides.py: token grids -> one pretrained slide encoder embedding per slide."""
    model: SlideEncoderModel = section(SlideEncoderModel)
    embed: SlideEmbedding = section(SlideEmbedding)


def check_slide_encoder_input(grids: Lineage, source: str | Path, entry: SlideEncoderEntry) -> None:
    """Refuse a set that is not token grids of the features the slide encoder reads, naming both encoders."""
    tile = grids.tile_encoder.architecture.get("encoder") if grids.tile_encoder else None
    if grids.kind != TOKEN_GRIDS or tile != entry.tile_encoder or grids.geometry.width != entry.in_dim:
        raise InputError(source, f"holds {grids.kind} of tile encoder {tile or 'unknown'} ({grids.geometry.width}-d "
                                 f"features); slide encoder {entry.name} reads token grids of {entry.tile_encoder} "
                                 f"({entry.in_dim}-d): embed the tiles with model.encoder={entry.tile_encoder}, or "
                                 "import that encoder's features with `hipt-shards build features`")


def slide_tiles(manifest: Mapping[str, Any], source: str | Path, entry: SlideEncoderEntry,
                min_tile_tissue: float) -> Iterator[tuple[SlideBag, int | None]]:
    """Each slide of a token-grid set as a slide encoder reads it: the bag of its tiles with min_tile_tissue
    (features [N, D], level-0 x, y [N, 2]) and, for an encoder that reads coordinates, the level-0 tile side."""
    for bag in progress(SlideBagStream(manifest), desc=f"slides for {entry.name}", unit="slide"):
        features, coords = tile_bag(bag["pixels"].float(), bag["coords"], bag["sizes"], bag["tissue"], min_tile_tissue)
        step = tile_step(bag, source, f"slide encoder {entry.name} needs") if entry.needs_coords else None
        yield SlideBag(bag["slide_id"], bag["patient_id"], bag["label"], features, coords,
                       manifest["slides"][bag["slide_id"]]["split"], len(bag["coords"])), step


def slide_encoder_bags(source: str | Path, entry: SlideEncoderEntry,
                       min_tile_tissue: float) -> tuple[list[SlideBag], list[str]]:
    """The bags a slide encoder is fine-tuned on (models.mil.SlideEncoderClassifier's input) and the classes: each
    slide's tiles, their level-0 x, y and the tile side appended as three columns when the encoder reads them."""
    manifest = load_manifest(source)
    check_slide_encoder_input(read_lineage(manifest), source, entry)
    bags = []
    for tiles, step in slide_tiles(manifest, source, entry, min_tile_tissue):
        if step is not None:
            places = torch.cat([tiles.coords.float(), torch.full((len(tiles.coords), 1), float(step))], dim=1)
            tiles = replace(tiles, features=torch.cat([tiles.features, places], dim=1))
        bags.append(tiles)
    return bags, manifest["classes"]


@torch.no_grad()
def embed_slides(encoder: nn.Module, entry: SlideEncoderEntry, weights: Mapping[str, str], source: str | Path,
                 out: str | Path, *, settings: Mapping[str, Any], min_tile_tissue: float = 1e-3) -> dict:
    """Every slide of the token-grid set ``source`` -> the slide encoder's embedding of its tiles (those with
    min_tile_tissue, with their level-0 coordinates), written to ``out`` as slide bags of one row each (no
    coordinates); returns the manifest. ``weights``: the {path, sha256} the encoder loaded, for the lineage.
    The main process does it all (a slide is one small forward pass); the others wait for it."""
    manifest = load_manifest(source)
    grids = read_lineage(manifest)
    check_slide_encoder_input(grids, source, entry)
    accelerator = make_accelerator()
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return load_manifest(out)
    device = accelerator.device
    encoder = encoder.to(device).eval()
    bags = []
    for tiles, step in slide_tiles(manifest, source, entry, min_tile_tissue):
        embedding = encoder(tiles.features.to(device), tiles.coords.to(device) if step is not None else None, step)
        bags.append(replace(tiles, features=embedding.float().cpu()[None], coords=torch.full((1, 2), -1)))
    architecture = {"slide_encoder": entry.name, "tile_encoder": entry.tile_encoder, "in_dim": entry.in_dim,
                    "width": entry.width, "needs_coords": entry.needs_coords, "release": entry.release}
    lineage = Lineage(SLIDE_EMBEDDINGS, replace(grids.geometry, width=entry.width), source_of(manifest),
                      grids.tile_encoder, slide_encoder=Encoder(architecture, weights["path"], weights["sha256"]))
    written = write_slide_bags(out, bags, manifest["classes"], build_args=dict(settings), lineage=lineage.as_dict())
    accelerator.wait_for_everyone()
    return written


def slide_units(manifest: Mapping[str, Any]) -> list[list[int]]:
    """Shard positions grouped so that a slide continuing into the next shard stays in one group."""
    units: list[list[int]] = [[]]
    for position, shard in enumerate(manifest["shards"]):
        units[-1].append(position)
        if not shard["slide_continues"]:
            units.append([])
    return [unit for unit in units if unit]


class UnitItems(IterableDataset):
    """Reader i of n's undone input units i, i + n, ...: their `items_of(unit)`, then {"unit", "end": True}."""

    def __init__(self, source: str | Path | Mapping, done: set[int]) -> None:
        super().__init__()
        self.manifest = load_manifest(source)
        self.urls = shard_urls(self.manifest)
        self.units = slide_units(self.manifest)
        self.done = done

    def todo(self, reader: int, readers: int) -> list[int]:
        return [unit for unit in range(len(self.units))[reader::readers] if unit not in self.done]

    def regions(self, units: Sequence[int]) -> int:
        """The input samples (regions) of these units."""
        return sum(self.manifest["shards"][p]["samples"] for unit in units for p in self.units[unit])

    def samples(self, unit: int) -> Iterator[dict]:
        for position in self.units[unit]:
            yield from tar_samples(self.urls[position])

    def items_of(self, unit: int) -> Iterator[dict]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict]:
        for unit in self.todo(*reader_info()):
            for item in self.items_of(unit):
                yield {"unit": unit, **item}
            yield {"unit": unit, "end": True}


class UnitRegionBatches(UnitItems):
    """Regions of each unit in batches of `batch` that never span units (so a unit's grids do not depend on
    which reader computes it): {"pixels", "record", "key"} lists, pixels stacked (or JPEG, decode="gpu")."""

    def __init__(self, source: str | Path | Mapping, done: set[int], batch: int, decode: str = "cpu") -> None:
        super().__init__(source, done)
        self.batch, self.decode = batch, decode

    def items_of(self, unit: int) -> Iterator[dict]:
        regions = []
        for sample in self.samples(unit):
            pixels, record = decode_sample(sample, self.decode)
            regions.append({"pixels": pixels, "record": record, "key": sample["__key__"]})
            if len(regions) == self.batch:
                yield collate(regions)
                regions = []
        if regions:
            yield collate(regions)


class UnitSlideBags(UnitItems):
    """The slides of each unit, a bag of all its regions each, with its place in the manifest ("ordinal")."""

    def __init__(self, source: str | Path | Mapping, done: set[int]) -> None:
        super().__init__(source, done)
        self.bags = SlideBagStream(self.manifest)
        self.ordinals = {slide: n for n, slide in enumerate(self.manifest["slides"])}

    def items_of(self, unit: int) -> Iterator[dict]:
        for slide_id, samples in groupby(self.samples(unit), key=lambda s: json.loads(s["json"])["slide_id"]):
            yield {"bag": self.bags.decode_bag(list(samples)), "ordinal": self.ordinals[slide_id]}


def _units_done(accelerator: Accelerator, shard_set: ShardSetWriter, units: int) -> set[int]:
    """The units an interrupted run with the same settings finished (refusing one with other settings)."""
    done = set(shard_set.resume(accelerator.is_main_process, accelerator.wait_for_everyone))
    if done:
        log.info("%s: %d of %d units done by an earlier run; embedding the other %d", shard_set.out, len(done),
                 units, units - len(done))
    return done


def _finish(accelerator: Accelerator, writer: UnitShards, kind: str, source: Mapping[str, Any], units: int,
            lineage: Lineage) -> dict:
    """When every process is done: the manifest and index from the unit records, the config beside them."""
    accelerator.wait_for_everyone()
    out = writer.shard_set.out
    if accelerator.is_main_process:
        writer.finish(kind, source["classes"], source["samples"], units, lineage.as_dict())
        save_config(writer.shard_set.settings, out)
    accelerator.wait_for_everyone()
    manifest = json.loads((out / MANIFEST).read_text())
    log.info("%d input regions = %d written + 0 skipped; %d samples in %d shards -> %s", source["samples"],
             manifest["written"], manifest["samples"], len(manifest["shards"]), out)
    return manifest


@torch.no_grad()
def embed_tiles(encoder: nn.Module, source: str | Path, out: str | Path, *, settings: Mapping[str, Any],
                tile_encoder: Encoder, normalisation: str, regions_per_batch: int, tiles_per_call: int,
                workers: int = 0, dtype: str = "float16", mixed_precision: str | None = None,
                decode: str = "cpu") -> dict:
    """Every region of the shard set ``source`` -> its token grid, written as shards to ``out``; returns the
    manifest. ``settings`` become its build_args, ``tile_encoder`` (the encoder's record) its lineage; regions of
    another geometry than the encoder's card records are refused. decode="gpu": JPEGs decode on the device."""
    accelerator = make_accelerator(mixed_precision)
    shard_set = ShardSetWriter(out, settings)
    if (manifest := shard_set.finished()) is not None:
        return manifest
    source_manifest = load_manifest(source)
    pixels = read_lineage(source_manifest)
    check_card(pixels.geometry, source, tile_encoder.card)
    lineage = Lineage(TOKEN_GRIDS, replace(pixels.geometry, width=encoder.num_features), source_of(source_manifest),
                      tile_encoder)
    outputs, units = UnitShards(shard_set), len(slide_units(source_manifest))
    dataset = UnitRegionBatches(source_manifest, _units_done(accelerator, shard_set, units), regions_per_batch,
                                decode_mode(decode, accelerator.device))
    encoder = select_attention(encoder.to(accelerator.device).eval(), accelerator.device, accelerator.mixed_precision)
    mine = [u for w in range(max(workers, 1))
            for u in dataset.todo(accelerator.process_index * max(workers, 1) + w, accelerator.num_processes * max(workers, 1))]
    bar = progress(total=dataset.regions(mine), desc="embed tiles", unit="region", disable=not accelerator.is_main_process)
    for item in DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=accelerator.device.type == "cuda"):
        if item.get("end"):
            outputs.close(item["unit"], dataset.regions([item["unit"]]))
            continue
        tile_px = {record["tile_px"] for record in item["record"]}
        if len(tile_px) > 1:
            raise ValueError(f"regions of one batch have different tile sizes {sorted(tile_px)}")
        with accelerator.autocast():
            grids = token_grids(encoder, device_pixels(item["pixels"], accelerator.device), tile_px.pop(),
                                normalisation, tiles_per_call)
        for key, record, grid in zip(item["key"], item["record"], grids.to(DTYPES[dtype]).cpu().numpy()):
            ext, data = encode_grid(grid)
            grid_record = {**record, "height": grid.shape[1], "width": grid.shape[2],
                           "region_height": record["height"], "region_width": record["width"]}
            outputs.add(item["unit"], {"__key__": key, ext: data, "json": json.dumps(grid_record).encode()}, record, 1)
        bar.update(len(grids))
    bar.close()
    return _finish(accelerator, outputs, GRIDS_KIND, source_manifest, units, lineage)


@torch.no_grad()
def embed_regions(encoder: nn.Module | None, source: str | Path, out: str | Path, *, settings: Mapping[str, Any],
                  region_encoder: Encoder | None, regions_per_batch: int, workers: int = 0,
                  mixed_precision: str | None = None, min_tile_tissue: float = 0.0) -> dict:
    """Every slide of the token-grid shard set ``source`` -> its region embeddings [M, D] (float32) with
    coordinates, written as shards to ``out``; returns the manifest. encoder None: the bag of every tile
    embedding instead (`tile_bag`). Grids of another width or geometry than the encoder's card are refused."""
    accelerator = make_accelerator(mixed_precision)
    shard_set = ShardSetWriter(out, settings)
    if (manifest := shard_set.finished()) is not None:
        return manifest
    source_manifest = load_manifest(source)
    grids = read_lineage(source_manifest)
    geometry = grids.geometry
    if encoder is not None:
        check_card(geometry, source, region_encoder.card if region_encoder else None, encoder.in_dim,
                   "the region encoder (model.*)")
        geometry = replace(geometry, width=encoder.num_features)
    lineage = Lineage(REGION_EMBEDDINGS if encoder is not None else TILE_EMBEDDINGS, geometry,
                      source_of(source_manifest), grids.tile_encoder, region_encoder if encoder is not None else None)
    outputs, units = UnitShards(shard_set), len(slide_units(source_manifest))
    dataset = UnitSlideBags(source_manifest, _units_done(accelerator, shard_set, units))
    if encoder is not None:
        encoder = select_attention(encoder.to(accelerator.device).eval(), accelerator.device, accelerator.mixed_precision)
    for item in progress(DataLoader(dataset, batch_size=None, num_workers=workers),
                         desc="embed regions" if encoder is not None else "tile bags", unit="slide",
                         disable=not accelerator.is_main_process):
        if item.get("end"):
            outputs.close(item["unit"], dataset.regions([item["unit"]]))
            continue
        bag = item["bag"]
        if encoder is None:
            features, coords = tile_bag(bag["pixels"].float(), bag["coords"], bag["sizes"], bag["tissue"],
                                        min_tile_tissue)
        else:
            grids = bag["pixels"].to(accelerator.device)
            with accelerator.autocast():
                features = torch.cat([encoder(chunk.float()) for chunk in grids.split(regions_per_batch)])
            coords = bag["coords"]
        regions = len(bag["coords"])
        slide = SlideBag(bag["slide_id"], bag["patient_id"], bag["label"], features.float().cpu(), coords,
                         split=source_manifest["slides"][bag["slide_id"]]["split"], regions=regions)
        outputs.add(item["unit"], bag_sample(slide, item["ordinal"], source_manifest["classes"], np.dtype("float32")),
                    {"slide_id": slide.slide_id, "label": slide.label, "patient_id": slide.patient_id,
                     "split": slide.split}, regions)
    return _finish(accelerator, outputs, BAG_KIND, source_manifest, units, lineage)
