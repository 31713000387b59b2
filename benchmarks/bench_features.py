"""Importing TRIDENT features against building the same token grids from pixels, for many small slides.

    python benchmarks/bench_features.py --slides 1000 --size 256

Synthetic pseudo-H&E slides (PNG, `--size` px at 0.5 um/px) are built into region shards (`hipt-shards build
images`, 128 px regions of 32 px tiles) and embedded by a randomly initialised tiny tile ViT (`embed_tiles`): the
pixel path, timed. Its grids are written in TRIDENT's layout (`hipt-shards export`, one .h5 per slide, not
timed: what a lab already holds) and imported (`hipt-shards build features`), timed. The imported grids must
equal the embedded ones exactly. Last line: `features import: N slides in A s (B bytes), from pixels C s (D
bytes), ratio C/A`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hipt_e2e.config import setup_logging
from hipt_e2e.data import RegionStream, load_manifest
from hipt_e2e.data.features import export_trident
from hipt_e2e.data.synthetic import make_dataset
from hipt_e2e.embedding import embed_tiles
from hipt_e2e.lineage import encoder_record
from hipt_e2e.models.bundle import tile_architecture
from hipt_e2e.models.encoders import TileModel, build_tile_encoder
from shards.build import BuildSettings, build
from shards.features import FeatureBuildSettings, build_features


def timed(step, *args) -> float:
    start = time.perf_counter()
    step(*args)
    return time.perf_counter() - start


def from_pixels(slides: Path, root: Path) -> None:
    build(BuildSettings.from_mapping({"kind": "images", "input": str(slides), "out": str(root / "regions"),
                                      "labels": str(slides / "labels.csv"), "slide_mpp": 0.5, "region_px": 128,
                                      "tile_px": 32, "min_tissue": 0.0}))
    model = TileModel(preset="tiny")
    torch.manual_seed(0)
    embed_tiles(build_tile_encoder(model).eval(), root / "regions", root / "grids", settings={},
                tile_encoder=encoder_record(tile_architecture(model), None), normalisation="hipt",
                regions_per_batch=16, tiles_per_call=512)


def from_features(slides: Path, root: Path) -> None:
    build_features(FeatureBuildSettings.from_mapping({"input": str(root / "h5"), "out": str(root / "imported"),
                                                      "labels": str(slides / "labels.csv"), "grid": 4}))


def shard_bytes(folder: Path) -> int:
    return sum(shard["bytes"] for shard in load_manifest(folder)["shards"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=1000, help="slides, half of each class")
    parser.add_argument("--size", type=int, default=256, help="slide side in px (128 px regions)")
    args = parser.parse_args()
    setup_logging("WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slides = make_dataset(root / "slides", slides_per_class=args.slides // 2, size=args.size, region_px=128)
        pixels = timed(from_pixels, slides, root)
        export_trident(root / "grids", root / "h5")
        features = timed(from_features, slides, root)
        ours = {(i["record"]["slide_id"], i["record"]["region_index"]): i["pixels"] for i in RegionStream(root / "grids")}
        back = {(i["record"]["slide_id"], i["record"]["region_index"]): i["pixels"] for i in RegionStream(root / "imported")}
        same = ours.keys() == back.keys() and all(torch.equal(ours[key], back[key]) for key in ours)
        h5_bytes = sum(path.stat().st_size for path in (root / "h5").glob("*.h5"))
        print(f"{args.slides} slides of {args.size} px, {len(ours)} regions of 4 x 4 tiles, {h5_bytes:,} bytes of "
              f".h5 files; imported grids equal the embedded ones exactly: {same}")
        print(f"features import: {args.slides} slides in {features:.1f} s ({shard_bytes(root / 'imported'):,} bytes), "
              f"from pixels {pixels:.1f} s ({shard_bytes(root / 'grids'):,} bytes), ratio {pixels / features:.1f}")


if __name__ == "__main__":
    main()
