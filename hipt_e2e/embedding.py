"""The two embedding steps of the staged path, each shard set in -> shard set out.

embed_tiles:   regions (uint8 [3, H, W]) -> token grids [D, rows, cols] (one sample per region, the
               region's key and record kept, `grid.npy` entry), batched over regions.
embed_regions: token grids of a slide -> its region embeddings [M, D'] with their coordinates, one
               sample per slide in the slide-embedding format of hipt_e2e.data.embeddings; or, without a
               region encoder, the bag of all its tile embeddings [N, D] (attention-MIL's usual input).

Work is split across processes and DataLoader workers ("readers") by whole slides, so every slide
stays contiguous in one output part, as the slide-bag stream needs. Each reader writes its own part
(`part-i-of-n`, the layout of `hipt-shards build --part`), which are merged into one manifest at the
end; the manifest accounts for every input region (inputs = written + skipped, and skipped is empty).
"""
from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from hipt_e2e.config import save_config
from hipt_e2e.data.embeddings import SlideBag, write_slide_bags
from hipt_e2e.data.index import journal_rows, write_index
from hipt_e2e.data.manifest import GRIDS_KIND, class_counts, load_manifest, shard_urls
from hipt_e2e.data.samples import decode_mode, decode_sample, device_pixels, encode_grid
from hipt_e2e.data.storage import tar_samples
from hipt_e2e.data.streams import SlideBagStream, reader_info
from hipt_e2e.data.tiling import cut_tiles
from hipt_e2e.data.writer import ShardWriter
from hipt_e2e.io import atomic_write_json
from hipt_e2e.models import select_attention
from hipt_e2e.normalise import normalise
from hipt_e2e.progress import progress
from hipt_e2e.training.data import collate
from shards.build import FORMAT, FORMAT_VERSION, JOURNAL, part_dir, read_journal
from shards.merge import PART, merge

log = logging.getLogger(__name__)

DTYPES = {"float16": torch.float16, "float32": torch.float32}


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


class WholeSlideRegions(IterableDataset):
    """The regions of a shard set in build order; reader i of n (ranks x DataLoader workers) reads
    slide units i, i+n, ... Items: {"pixels", "record", "key", "reader"}; with decode="gpu" JPEG pixels
    stay encoded for the device to decode."""

    def __init__(self, source: str | Path, decode: str = "cpu") -> None:
        super().__init__()
        self.decode = decode
        manifest = load_manifest(source)
        self.urls = shard_urls(source)
        self.units = slide_units(manifest)
        self.unit_samples = [sum(manifest["shards"][p]["samples"] for p in unit) for unit in self.units]

    def samples_of_reader(self, reader: int, readers: int) -> int:
        return sum(self.unit_samples[reader::readers])

    def __iter__(self) -> Iterator[dict]:
        reader, readers = reader_info()
        for unit in self.units[reader::readers]:
            for position in unit:
                for sample in tar_samples(self.urls[position]):
                    pixels, record = decode_sample(sample, self.decode)
                    yield {"pixels": pixels, "record": record, "key": sample["__key__"], "reader": reader}


# ----------------------------------------------------------------------------------------- output
class GridPartWriter:
    """Token-grid samples of one reader -> shards, journal and manifest in one folder (a part to merge,
    or the whole output)."""

    def __init__(self, out_dir: Path, settings: Mapping[str, Any], classes: list[str], shard_bytes: int) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for leftover in [*out_dir.glob("shard-*.tar*"), out_dir / JOURNAL, out_dir / "manifest.json"]:
            leftover.unlink(missing_ok=True)  # of an interrupted run
        self.out_dir, self.settings, self.classes = out_dir, dict(settings), classes
        self.journal = out_dir / JOURNAL
        self.journal.write_text(json.dumps({"build_args": self.settings}) + "\n")
        self.writer = ShardWriter(out_dir, shard_bytes, self.journal, first_shard=0)
        self.slides: dict[str, dict[str, Any]] = {}
        self.regions = 0

    def add(self, sample: dict, record: Mapping[str, Any]) -> None:
        """The grid sample of the region whose (input) record is ``record``."""
        self.writer.add(sample, record["slide_id"], position=(len(self.slides), self.regions))
        entry = self.slides.setdefault(record["slide_id"], {
            "label": record["label"], "patient_id": record["patient_id"], "split": record.get("split"), "regions": 0})
        entry["regions"] += 1
        self.regions += 1

    def finish(self, inputs: int) -> dict:
        """Close the last shard and write the manifest; ``inputs`` = the input regions this part had to write."""
        self.writer.finish(resume=None)
        shards, _, _ = read_journal(self.journal, self.settings)
        if self.regions != inputs:
            raise RuntimeError(f"{self.out_dir}: wrote {self.regions} regions of {inputs} inputs")
        for entry in self.slides.values():
            entry["shards"] = []
        for shard in shards:
            for slide_id in shard["slides"]:
                self.slides[slide_id]["shards"].append(shard["name"])
        manifest = {
            "format": FORMAT, "version": FORMAT_VERSION, "kind": GRIDS_KIND, "build_args": self.settings,
            "classes": self.classes, "class_counts": class_counts(self.slides),
            "inputs": inputs, "written": self.regions, "n_skipped": 0, "skipped": [],
            "samples": sum(shard["samples"] for shard in shards), "slides": self.slides, "shards": shards,
        }
        write_index(self.out_dir, shards, journal_rows(self.journal))
        atomic_write_json(self.out_dir / "manifest.json", manifest)
        return manifest


def _existing_output(out: Path, settings: Mapping[str, Any]) -> dict | None:
    """The manifest of a finished earlier run with the same settings (None if there is none)."""
    if not (out / "manifest.json").exists():
        return None
    manifest = load_manifest(out)
    if manifest["build_args"] != dict(settings):
        raise FileExistsError(f"{out} already holds embeddings made with other settings; choose another out=")
    log.info("%s is already complete (%d samples); nothing to do", out, manifest["samples"])
    return manifest


def _clear_stale_parts(accelerator: Accelerator, out: Path, readers: int) -> None:
    """Remove the parts of an earlier, interrupted run with another reader count (main process)."""
    if accelerator.is_main_process and out.is_dir():
        keep = {part_dir(out, f"{reader}/{readers}").name for reader in range(readers)} if readers > 1 else set()
        for stale in out.iterdir():
            if stale.is_dir() and PART.match(stale.name) and stale.name not in keep:
                shutil.rmtree(stale)
    accelerator.wait_for_everyone()


def _finish_output(accelerator: Accelerator, out: Path, readers: int, inputs: int,
                   settings: Mapping[str, Any]) -> dict:
    """After every part is written: merge the parts and write the config (main process), check the accounting."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and readers > 1:
        merge(out)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_config(settings, out)
    manifest = load_manifest(out)
    written = sum(entry["regions"] for entry in manifest["slides"].values())
    if written != inputs:
        raise RuntimeError(f"{out}: {written} regions written of {inputs} input regions")
    log.info("%d input regions = %d written + 0 skipped; %d samples in %d shards -> %s", inputs, written,
             manifest["samples"], len(manifest["shards"]), out)
    return manifest


# -------------------------------------------------------------------------------------- the steps
@torch.no_grad()
def embed_tiles(encoder: nn.Module, source: str | Path, out: str | Path, *, settings: Mapping[str, Any],
                normalisation: str, regions_per_batch: int, tiles_per_call: int, workers: int = 0,
                dtype: str = "float16", shard_bytes: int = 1_000_000_000,
                mixed_precision: str | None = None, decode: str = "cpu") -> dict:
    """Every region of the shard set ``source`` -> its token grid, written as shards to ``out``.

    ``settings`` (e.g. the recipe config) is recorded as the output's build_args. ``decode="gpu"``:
    JPEG regions are decoded on the CUDA device in batches (the CPU readers when there is none). Returns
    the manifest.
    """
    out = Path(out)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    if (manifest := _existing_output(out, settings)) is not None:
        return manifest
    source_manifest = load_manifest(source)
    dataset = WholeSlideRegions(source, decode_mode(decode, accelerator.device))
    readers = accelerator.num_processes * max(workers, 1)
    mine = [accelerator.process_index * max(workers, 1) + w for w in range(max(workers, 1))]
    _clear_stale_parts(accelerator, out, readers)
    writers = {reader: GridPartWriter(part_dir(out, f"{reader}/{readers}" if readers > 1 else None), settings,
                                      source_manifest["classes"], shard_bytes) for reader in mine}
    encoder = select_attention(encoder.to(accelerator.device).eval(), accelerator.device, accelerator.mixed_precision)
    loader = DataLoader(dataset, batch_size=regions_per_batch, num_workers=workers, collate_fn=collate,
                        pin_memory=accelerator.device.type == "cuda")
    bar = progress(total=sum(dataset.samples_of_reader(reader, readers) for reader in mine), desc="embed tiles",
                   unit="region", disable=not accelerator.is_main_process)
    for batch in loader:
        tile_px = {record["tile_px"] for record in batch["record"]}
        if len(tile_px) > 1:
            raise ValueError(f"regions of one batch have different tile sizes {sorted(tile_px)}")
        with accelerator.autocast():
            grids = token_grids(encoder, device_pixels(batch["pixels"], accelerator.device), tile_px.pop(),
                                normalisation, tiles_per_call)
        grids = grids.to(DTYPES[dtype]).cpu().numpy()
        for key, record, grid, reader in zip(batch["key"], batch["record"], grids, batch["reader"]):
            ext, data = encode_grid(grid)
            grid_record = {**record, "height": grid.shape[1], "width": grid.shape[2],
                           "region_height": record["height"], "region_width": record["width"]}
            writers[reader].add({"__key__": key, ext: data, "json": json.dumps(grid_record).encode()}, record)
        bar.update(len(grids))
    bar.close()
    for reader, writer in writers.items():
        writer.finish(inputs=dataset.samples_of_reader(reader, readers))
    return _finish_output(accelerator, out, readers, source_manifest["samples"], settings)


@torch.no_grad()
def embed_regions(encoder: nn.Module | None, source: str | Path, out: str | Path, *, settings: Mapping[str, Any],
                  regions_per_batch: int, workers: int = 0, shard_bytes: int = 1_000_000_000,
                  mixed_precision: str | None = None, min_tile_tissue: float = 0.0) -> dict:
    """Every slide of the token-grid shard set ``source`` -> its region embeddings [M, D] (float32) with
    coordinates, one sample per slide, written as shards to ``out``. encoder None: the bag of every tile
    embedding instead (`tile_bag`). Returns the manifest."""
    out = Path(out)
    accelerator = Accelerator(mixed_precision=mixed_precision)
    if (manifest := _existing_output(out, settings)) is not None:
        return manifest
    source_manifest = load_manifest(source)
    readers = accelerator.num_processes
    _clear_stale_parts(accelerator, out, readers)
    if encoder is not None:
        encoder = select_attention(encoder.to(accelerator.device).eval(), accelerator.device, accelerator.mixed_precision)

    def bags() -> Iterator[SlideBag]:
        # The slide-bag stream gives each process (and worker) the slides that start in its shards.
        for bag in progress(DataLoader(SlideBagStream(source), batch_size=None, num_workers=workers),
                            desc="embed regions" if encoder is not None else "tile bags", unit="slide",
                            disable=not accelerator.is_main_process):
            if encoder is None:
                features, coords = tile_bag(bag["pixels"].float(), bag["coords"], bag["sizes"], bag["tissue"],
                                            min_tile_tissue)
            else:
                grids = bag["pixels"].to(accelerator.device)
                with accelerator.autocast():
                    features = torch.cat([encoder(chunk.float()) for chunk in grids.split(regions_per_batch)])
                coords = bag["coords"]
            yield SlideBag(bag["slide_id"], bag["patient_id"], bag["label"], features.float().cpu(), coords,
                           split=source_manifest["slides"][bag["slide_id"]]["split"], regions=len(bag["coords"]))

    write_slide_bags(part_dir(out, f"{accelerator.process_index}/{readers}" if readers > 1 else None), bags(),
                     source_manifest["classes"], build_args=dict(settings), shard_bytes=shard_bytes)
    return _finish_output(accelerator, out, readers, source_manifest["samples"], settings)
