"""The two embedding steps of the staged path, each shard set in -> shard set out.

embed_tiles:   regions (uint8 [3, H, W]) -> token grids [D, rows, cols] (one sample per region, the
               region's key and record kept, `grid.npy` entry), batched over regions.
embed_regions: token grids of a slide -> its region embeddings [M, D'] with their coordinates, one
               sample per slide in the slide-embedding format of hipt_e2e.data.embeddings; or, without a
               region encoder, the bag of all its tile embeddings [N, D] (attention-MIL's usual input).

Work goes by input units (the shards whose slides belong together: a slide continuing into the next
shard keeps them in one unit), unit i to reader i mod n of the processes x DataLoader workers; each unit
becomes one output shard (UnitOutputs), so every slide stays contiguous, as the slide-bag stream needs.
The output does not depend on the number of readers, a killed run continues where it stopped (finished
units are kept and skipped), and the manifest accounts for every input region (inputs = written +
skipped, and skipped is empty).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import webdataset as wds
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from hipt_e2e.config import Settings, bound, save_config, section
from hipt_e2e.data.embeddings import KIND as BAG_KIND
from hipt_e2e.data.embeddings import SlideBag, bag_sample
from hipt_e2e.data.index import index_file, write_index
from hipt_e2e.data.lineage import REGION_EMBEDDINGS, TILE_EMBEDDINGS, TOKEN_GRIDS, Encoder, Lineage, source_of
from hipt_e2e.data.manifest import GRIDS_KIND, MANIFEST, load_manifest, shard_set_manifest, shard_urls
from hipt_e2e.data.samples import collate, decode_mode, decode_sample, device_pixels, encode_grid
from hipt_e2e.data.storage import StorageSettings, tar_samples
from hipt_e2e.data.streams import SlideBagStream, reader_info
from hipt_e2e.data.tiling import cut_tiles
from hipt_e2e.io import atomic_write_json, sha256_file
from hipt_e2e.lineage import check_card, read_lineage
from hipt_e2e.models import select_attention
from hipt_e2e.models.encoders import RegionModelWithWeights, TileModelWithWeights
from hipt_e2e.normalise import normalise
from hipt_e2e.progress import progress
from hipt_e2e.runtime import Precision, make_accelerator

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "float32": torch.float32}
UNITS = "units"  # out/units/: the settings and one record per finished unit, what a rerun skips


# ------------------------------------------------------------------------------------------ settings
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
    mixed_precision: Precision = None  # no | bf16 | fp16; null: as `accelerate launch` says


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


# ------------------------------------------------------------------------------------------ maths
def token_grids(encoder: nn.Module, regions: torch.Tensor, tile_px: int, normalisation: str,
                tiles_per_call: int) -> torch.Tensor:
    """uint8 regions [B, 3, H, W] -> token grids [B, D, rows, cols], grid[:, :, r, c] = tile r * cols + c.

    The tiles of all B regions go through the encoder together, ``tiles_per_call`` at a time.
    """
    batch, _, height, width = regions.shape
    rows, cols = height // tile_px, width // tile_px
    tiles = cut_tiles(regions, tile_px).flatten(0, 1)  # raster order per region
    embeddings = torch.cat([encoder(normalise(chunk, normalisation)) for chunk in tiles.split(tiles_per_call)])
    return embeddings.view(batch, rows, cols, -1).permute(0, 3, 1, 2)


def tile_bag(grids: torch.Tensor, coords: torch.Tensor, sizes: torch.Tensor, tissue: torch.Tensor,
             min_tissue: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A slide's token grids [M, D, rows, cols] -> every tile's embedding [N, D] and level-0 x, y [N, 2]
    (region by region, raster order within each), without tiles of less tissue than min_tissue (all are
    kept when none would be): the bag of attention-MIL directly over tile embeddings, no region stage."""
    n, dim, rows, cols = grids.shape
    features = grids.permute(0, 2, 3, 1).reshape(-1, dim)
    step = torch.where(sizes > 0, sizes // cols, 0)  # a tile's level-0 side; unknown coordinates stay -1
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    x = torch.where(coords[:, :1] >= 0, coords[:, :1] + col.flatten() * step[:, None], -1)
    y = torch.where(coords[:, 1:] >= 0, coords[:, 1:] + row.flatten() * step[:, None], -1)
    tile_coords = torch.stack([x, y], dim=-1).reshape(-1, 2)
    keep = tissue.reshape(-1) >= min_tissue
    if not keep.any():
        keep[:] = True
    return features[keep], tile_coords[keep]


# ------------------------------------------------------------------------------------------ input
def slide_units(manifest: Mapping[str, Any]) -> list[list[int]]:
    """Shard positions grouped so that a slide continuing into the next shard stays in one group."""
    units: list[list[int]] = [[]]
    for position, shard in enumerate(manifest["shards"]):
        units[-1].append(position)
        if not shard["slide_continues"]:
            units.append([])
    return [unit for unit in units if unit]


class UnitItems(IterableDataset):
    """What one reader (of ranks x DataLoader workers) has to embed: input units i, i + n, ... that are
    not done yet, in order. Items: {"unit", ...} from `items_of(unit)`, then {"unit", "end": True}."""

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
    """Regions of each unit in batches of `batch` (batches never span units, so a unit's grids do not
    depend on which reader computes it): {"pixels", "record", "key"} lists, pixels stacked (with
    decode="gpu" JPEG pixels stay encoded for the device)."""

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
    """The slides of each unit, one bag of all its regions each (SlideBagStream's slide items), with the
    slide's place in the manifest ("ordinal")."""

    def __init__(self, source: str | Path | Mapping, done: set[int]) -> None:
        super().__init__(source, done)
        self.bags = SlideBagStream(self.manifest)
        self.ordinals = {slide: n for n, slide in enumerate(self.manifest["slides"])}

    def items_of(self, unit: int) -> Iterator[dict]:
        for slide_id, samples in groupby(self.samples(unit), key=lambda s: json.loads(s["json"])["slide_id"]):
            yield {"bag": self.bags.decode_bag(list(samples)), "ordinal": self.ordinals[slide_id]}


# ----------------------------------------------------------------------------------------- output
class UnitOutputs:
    """An embedding step's output: one shard per input unit, `shard-{unit:06d}.tar`, written to a temporary
    file and renamed into place, then recorded in `units/{unit:06d}.json` (its shard entry, slides and index
    rows). The layout depends on the input alone, so any number of processes or machines write the same
    files; a rerun skips the recorded units (a killed run redoes only the units it was writing); and the
    manifest and index are made from the records when every unit is done."""

    def __init__(self, out: Path, settings: Mapping[str, Any], lineage: Lineage) -> None:
        self.out, self.settings, self.lineage = out, dict(settings), lineage
        self.records = out / UNITS
        self.open: dict[int, tuple[Any, wds.TarWriter, dict[str, dict]]] = {}

    def done(self, accelerator: Accelerator) -> set[int]:
        """Units finished by an earlier run with the same settings (refuses one with other settings). A run
        that recorded no unit holds nothing to protect: its settings are replaced by these."""
        settings = self.records / "settings.json"
        if accelerator.is_main_process:
            self.records.mkdir(parents=True, exist_ok=True)
            if not settings.exists() or not self._recorded():
                atomic_write_json(settings, self.settings)
        accelerator.wait_for_everyone()
        if json.loads(settings.read_text()) != json.loads(json.dumps(self.settings)):
            raise FileExistsError(f"{self.out} holds an interrupted run with other settings; choose another out= "
                                  "or delete it")
        return self._recorded()

    def _recorded(self) -> set[int]:
        return {int(path.stem) for path in self.records.glob("[0-9]*.json")}

    def add(self, unit: int, sample: dict, slide: Mapping[str, Any], regions: int) -> None:
        """A sample of `unit` for the slide `slide` (its input record or bag: label, patient, split), holding
        `regions` input regions."""
        if unit not in self.open:
            stream = open(self.out / f"{self._name(unit)}.tmp", "wb")
            self.open[unit] = (stream, wds.TarWriter(stream, encoder=False, mtime=0), {})
        _, tar, slides = self.open[unit]
        tar.write(sample)
        entry = slides.setdefault(slide["slide_id"], {"label": slide["label"], "patient_id": slide["patient_id"],
                                                      "split": slide.get("split"), "regions": 0, "samples": 0})
        entry["regions"] += regions
        entry["samples"] += 1

    def close(self, unit: int, inputs: int) -> None:
        """Rename unit's shard into place and record it; `inputs`: the input regions the unit held."""
        stream, tar, slides = self.open.pop(unit)
        tar.close()
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        final = self.out / self._name(unit)
        os.replace(self.out / f"{final.name}.tmp", final)
        written = sum(entry["regions"] for entry in slides.values())
        if written != inputs:
            raise RuntimeError(f"{final}: wrote {written} regions of the {inputs} its input holds")
        shard = {"name": final.name, "samples": sum(e["samples"] for e in slides.values()), "bytes": final.stat().st_size,
                 "sha256": sha256_file(final), "slides": {s: e.pop("samples") for s, e in slides.items()},
                 "slide_continues": False}
        atomic_write_json(self.records / f"{unit:06d}.json", {"shard": shard, "slides": slides,
                                                              "index": index_file(final)})

    @staticmethod
    def _name(unit: int) -> str:
        return f"shard-{unit:06d}.tar"

    def finish(self, accelerator: Accelerator, kind: str, source: Mapping[str, Any], units: int) -> dict:
        """When every process is done: the manifest and index from the unit records (main process), the
        config beside them; checks that every input region was written."""
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            records = [json.loads((self.records / f"{unit:06d}.json").read_text()) for unit in range(units)]
            shards = [record["shard"] for record in records]
            slides = {slide: {**entry, "shards": [record["shard"]["name"]]}
                      for record in records for slide, entry in record["slides"].items()}
            written = sum(entry["regions"] for entry in slides.values())
            manifest = shard_set_manifest(kind, self.settings, source["classes"], slides, shards,
                                          inputs=source["samples"], written=written, lineage=self.lineage.as_dict())
            write_index(self.out, shards, {r["shard"]["name"]: [tuple(row) for row in r["index"]] for r in records})
            atomic_write_json(self.out / MANIFEST, manifest)
            save_config(self.settings, self.out)
        accelerator.wait_for_everyone()
        manifest = load_manifest(self.out)
        if manifest["written"] != source["samples"]:
            raise RuntimeError(f"{self.out}: {manifest['written']} regions written of {source['samples']} input regions")
        log.info("%d input regions = %d written + 0 skipped; %d samples in %d shards -> %s", source["samples"],
                 manifest["written"], manifest["samples"], len(manifest["shards"]), self.out)
        return manifest


def _existing_output(out: Path, settings: Mapping[str, Any]) -> dict | None:
    """The manifest of a finished earlier run with the same settings (None if there is none)."""
    if not (out / MANIFEST).exists():
        return None
    manifest = load_manifest(out)
    if manifest["build_args"] != json.loads(json.dumps(dict(settings))):
        raise FileExistsError(f"{out} already holds embeddings made with other settings; choose another out=")
    log.info("%s is already complete (%d samples); nothing to do", out, manifest["samples"])
    return manifest


def _units_done(accelerator: Accelerator, outputs: UnitOutputs, units: int) -> set[int]:
    done = outputs.done(accelerator)
    if done:
        log.info("%s: %d of %d units done by an earlier run; embedding the other %d", outputs.out, len(done),
                 units, units - len(done))
    return done


# -------------------------------------------------------------------------------------- the steps
@torch.no_grad()
def embed_tiles(encoder: nn.Module, source: str | Path, out: str | Path, *, settings: Mapping[str, Any],
                tile_encoder: Encoder, normalisation: str, regions_per_batch: int, tiles_per_call: int,
                workers: int = 0, dtype: str = "float16", mixed_precision: str | None = None,
                decode: str = "cpu") -> dict:
    """Every region of the shard set ``source`` -> its token grid, written as shards to ``out`` (one per
    input unit, see UnitOutputs: resumable, the same files for any number of processes).

    ``settings`` (e.g. the recipe config) is recorded as the output's build_args, ``tile_encoder`` (the
    encoder's record) in its lineage; regions of another geometry than the encoder's card records are
    refused. ``decode="gpu"``: JPEG regions are decoded on the CUDA device in batches (the CPU readers when
    there is none). Returns the manifest.
    """
    out = Path(out)
    accelerator = make_accelerator(mixed_precision)
    if (manifest := _existing_output(out, settings)) is not None:
        return manifest
    source_manifest = load_manifest(source)
    pixels = read_lineage(source_manifest)
    check_card(pixels.geometry, source, tile_encoder.card)
    outputs = UnitOutputs(out, settings, Lineage(TOKEN_GRIDS, replace(pixels.geometry, width=encoder.num_features),
                                                 source_of(source_manifest), tile_encoder))
    units = len(slide_units(source_manifest))
    dataset = UnitRegionBatches(source_manifest, _units_done(accelerator, outputs, units), regions_per_batch,
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
    return outputs.finish(accelerator, GRIDS_KIND, source_manifest, units)


@torch.no_grad()
def embed_regions(encoder: nn.Module | None, source: str | Path, out: str | Path, *, settings: Mapping[str, Any],
                  region_encoder: Encoder | None, regions_per_batch: int, workers: int = 0,
                  mixed_precision: str | None = None, min_tile_tissue: float = 0.0) -> dict:
    """Every slide of the token-grid shard set ``source`` -> its region embeddings [M, D] (float32) with
    coordinates, one sample per slide, written as shards to ``out`` (one per input unit, see UnitOutputs).
    encoder None: the bag of every tile embedding instead (`tile_bag`). ``region_encoder``: the encoder's
    record, for the lineage; token grids of another width than the encoder takes, or of another geometry
    than its card records, are refused. Returns the manifest."""
    out = Path(out)
    accelerator = make_accelerator(mixed_precision)
    if (manifest := _existing_output(out, settings)) is not None:
        return manifest
    source_manifest = load_manifest(source)
    grids = read_lineage(source_manifest)
    geometry = grids.geometry
    if encoder is not None:
        check_card(geometry, source, region_encoder.card if region_encoder else None, encoder.in_dim,
                   "the region encoder (model.*)")
        geometry = replace(geometry, width=encoder.num_features)
    outputs = UnitOutputs(out, settings, Lineage(REGION_EMBEDDINGS if encoder is not None else TILE_EMBEDDINGS,
                                                 geometry, source_of(source_manifest), grids.tile_encoder,
                                                 region_encoder if encoder is not None else None))
    units = len(slide_units(source_manifest))
    dataset = UnitSlideBags(source_manifest, _units_done(accelerator, outputs, units))
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
    return outputs.finish(accelerator, BAG_KIND, source_manifest, units)
