"""`hipt-shards inspect` (counts and a mosaic) and `hipt-shards bench` (streaming throughput)."""
from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader

from hipt_e2e.data.manifest import load_manifest
from hipt_e2e.data.streams import RegionStream, TileStream
from hipt_e2e.errors import UserError


def count_tables(root: str | Path) -> str:
    """Per-class and per-slide counts as plain-text tables."""
    manifest = load_manifest(root)
    lines = [f"{manifest['samples']} samples in {len(manifest['shards'])} shards; {manifest['inputs']} inputs = "
             f"{manifest['written']} written + {manifest['n_skipped']} skipped", "",
             f"{'class':<24}{'slides':>8}{'regions':>10}"]
    for label in manifest["classes"]:
        lines.append(f"{label:<24}{manifest['class_counts']['slides'].get(label, 0):>8}"
                     f"{manifest['class_counts']['regions'].get(label, 0):>10}")
    if manifest["slides"]:
        lines += ["", f"{'slide':<32}{'label':<16}{'patient':<20}{'regions':>8}  shards"]
        for slide_id, entry in manifest["slides"].items():
            lines.append(f"{slide_id:<32}{str(entry['label']):<16}{str(entry['patient_id']):<20}"
                         f"{entry['regions']:>8}  {','.join(entry['shards'])}")
    for record in manifest["skipped"]:
        lines.append(f"skipped: {record['path']}: {record['reason']}")
    return "\n".join(lines)


def mosaic(root: str | Path, out_png: str | Path, count: int = 16, thumb_px: int = 128) -> Path:
    """A grid of the first `count` regions (downscaled), for a quick look at what was cut."""
    regions = list(itertools.islice(RegionStream(root), count))
    if not regions:
        raise UserError(f"{root}: no samples to show")
    cols = math.ceil(math.sqrt(len(regions)))
    rows = math.ceil(len(regions) / cols)
    canvas = Image.new("RGB", (cols * thumb_px, rows * thumb_px), "white")
    for n, region in enumerate(regions):
        image = Image.fromarray(region["pixels"].permute(1, 2, 0).numpy())
        image.thumbnail((thumb_px, thumb_px))
        canvas.paste(image, ((n % cols) * thumb_px, (n // cols) * thumb_px))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_png)
    return out_png


def bench(root: str | Path, seconds: float = 10.0, workers: int = 0) -> dict:
    """Decoded tiles/s and compressed MB/s of the tile stream over `seconds` (epochs repeat)."""
    manifest = load_manifest(root)
    loader = DataLoader(TileStream(root), batch_size=None, num_workers=workers)
    tiles, tiles_per_region, start = 0, 1, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for tile in loader:
            tiles += 1
            tiles_per_region = int(np.prod(tile["record"]["grid"]))
            if time.perf_counter() - start >= seconds:
                break
    elapsed = time.perf_counter() - start
    bytes_per_tile = sum(shard["bytes"] for shard in manifest["shards"]) / max(1, manifest["samples"] * tiles_per_region)
    return {"tiles": tiles, "seconds": elapsed, "tiles_per_s": tiles / elapsed,
            "mb_per_s": tiles / elapsed * bytes_per_tile / 1e6, "bytes_per_tile": bytes_per_tile}
