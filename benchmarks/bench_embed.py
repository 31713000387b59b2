"""Staged embedding from JPEG shards: tiles/s including decode, with the regions decoded by the CPU readers
(DataLoader workers, Pillow) against decoded in batches on the GPU (nvJPEG, `data.decode=gpu`), in one run.

    python benchmarks/bench_embed.py --preset hipt --regions 48 --workers 8    # GPU check part 2 (4096 px regions)
    python benchmarks/bench_embed.py --preset tiny --regions 8 --workers 0     # the CPU dry run

Synthetic pseudo-H&E regions (a few distinct ones, each written as several slides) are built into JPEG q95
shards with `hipt-shards build`; then `embed_tiles` (the staged path's own function: reading, decoding,
tiling, normalisation, the randomly initialised tile encoder, token grids written as shards) runs once per
decoding mode as warm-up and `--rounds` times timed. Without a CUDA device the gpu mode falls back to the CPU
readers (said in the table). Last line:
`embed tiles/s: cpu decode A, gpu decode B, ratio B/A, max grid difference D`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from accelerate import Accelerator

from hipt_e2e.config import setup_logging
from hipt_e2e.data.streams import RegionStream
from hipt_e2e.data.synthetic import CLASSES, synthetic_slide
from hipt_e2e.embedding import embed_tiles
from hipt_e2e.lineage import encoder_record
from hipt_e2e.models import model_preset
from hipt_e2e.models.bundle import tile_architecture
from hipt_e2e.models.encoders import TileModel, build_tile_encoder
from shards.build import BuildSettings, build


def write_region(path: Path, index: int, region_px: int) -> None:
    from PIL import Image

    rgb = synthetic_slide(CLASSES[index % len(CLASSES)], seed=index, size=region_px, region_px=region_px // 4)
    Image.fromarray(rgb).save(path, quality=95, subsampling=0)


def make_shards(root: Path, regions: int, distinct: int, region_px: int, tile_px: int) -> Path:
    """`regions` one-region slides (symlinks to `distinct` images) -> JPEG shards."""
    images = root / "distinct"
    images.mkdir(parents=True)
    paths = [images / f"region_{i}.jpg" for i in range(distinct)]
    with ProcessPoolExecutor(min(distinct, os.cpu_count() or 1)) as pool:
        list(pool.map(write_region, paths, range(distinct), [region_px] * distinct))
    for n in range(regions):
        folder = root / "slides" / CLASSES[n % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"slide_{n:04d}.jpg").symlink_to(paths[n % distinct])
    build(BuildSettings.from_mapping({"kind": "images", "input": str(root / "slides"), "out": str(root / "shards"),
                                      "labels_from_folders": True,
                                      "slide_mpp": 0.5, "region_px": region_px, "tile_px": tile_px, "min_tissue": 0.0, "encoding": "jpeg",
                                      "workers": min(8, os.cpu_count() or 1)}))
    return root / "shards"


def grids(path: Path) -> dict[str, torch.Tensor]:
    return {item["record"]["slide_id"]: item["pixels"].float() for item in RegionStream(path)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--regions", type=int, default=8)
    parser.add_argument("--distinct", type=int, default=4, help="distinct region images among the regions")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (both modes)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--regions-per-batch", type=int, default=4)
    parser.add_argument("--mixed-precision", default="bf16")
    args = parser.parse_args()
    setup_logging()
    geometry = model_preset(args.preset)
    tile_px, region_px = geometry["tile_px"], geometry["tile_px"] * geometry["region_tiles"]
    model = TileModel(preset=args.preset)
    encoder, record = build_tile_encoder(model).eval(), encoder_record(tile_architecture(model), None)
    device = Accelerator(mixed_precision=args.mixed_precision).device
    rows, rates, outputs = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(Path(tmp), args.regions, args.distinct, region_px, tile_px)
        tiles = args.regions * geometry["region_tiles"] ** 2
        for mode in ("cpu", "gpu"):
            times = []
            for run in range(args.rounds + 1):  # the first is warm-up (kernels, page cache, worker start)
                out = Path(tmp) / f"grids_{mode}_{run}"
                start = time.perf_counter()
                embed_tiles(encoder, shards, out, settings={"mode": mode, "run": run}, tile_encoder=record, normalisation="hipt",
                            regions_per_batch=args.regions_per_batch, tiles_per_call=1024, workers=args.workers,
                            mixed_precision=args.mixed_precision, decode=mode)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                outputs[mode] = out
            rates[mode] = tiles / min(times[1:])
            label = mode if mode == "cpu" or device.type == "cuda" else "gpu (no CUDA: fell back to cpu)"
            rows.append(f"| {label} | {args.workers} | {device.type} | {tiles} | {rates[mode]:,.0f} |")
        cpu_grids, gpu_grids = grids(outputs["cpu"]), grids(outputs["gpu"])
        difference = max((cpu_grids[key] - gpu_grids[key]).abs().max().item() for key in cpu_grids)
    print(f"regions of {region_px} px ({geometry['region_tiles'] ** 2} tiles of {tile_px} px), preset {args.preset}, "
          f"{args.mixed_precision}, best of {args.rounds} timed runs after a warm-up")
    print("| decode | workers | device | tiles | tiles/s incl. decode and writing |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"embed tiles/s: cpu decode {rates['cpu']:,.0f}, gpu decode {rates['gpu']:,.0f}, "
          f"ratio {rates['gpu'] / rates['cpu']:.2f}, max grid difference {difference:.3g}")


if __name__ == "__main__":
    main()
