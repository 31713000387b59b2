"""CPU JPEG decoders for the shard readers: Pillow (what `decode_pixels` uses) against torchvision's
`decode_jpeg` on the CPU, on 256 px q95 4:4:4 tiles as `hipt-shards build --encoding jpeg` writes them.

    python benchmarks/bench_jpeg_decoders.py [--images ../shared/data/lymphoma-iicbu2008] [--tiles 300]

Tiles are cut from the lymphoma fields when the folder is there (else synthetic pseudo-H&E). The two
decoders alternate tile by tile, so load from anything else on the machine falls on both alike; each
decoded tile is compared pixel for pixel. Both produce the reader's layout (uint8 [3, H, W]). Last line:
`ms per tile: Pillow A, torchvision B, ratio B/A, identical N of M`.
"""
from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hipt_e2e.data.samples import decode_pixels, encode_pixels
from hipt_e2e.data.synthetic import CLASSES, synthetic_slide

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "lymphoma-iicbu2008"


def tiles(images: Path, count: int) -> tuple[list[np.ndarray], str]:
    """256 px tiles (the top-left corner of each field) and where they came from."""
    paths = sorted(p for p in images.glob("*/*") if p.suffix.lower() in (".png", ".tif", ".tiff", ".jpg"))[:count]
    if paths:
        return [np.asarray(Image.open(path).convert("RGB"))[:256, :256] for path in paths], str(images)
    synthetic = [synthetic_slide(CLASSES[n % len(CLASSES)], seed=n, size=256, region_px=64) for n in range(count)]
    return synthetic, "synthetic pseudo-H&E"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=IMAGES)
    parser.add_argument("--tiles", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from torchvision.io import ImageReadMode, decode_jpeg

    warnings.filterwarnings("ignore", message=".*decoding and encoding capabilities of TorchVision")
    rgb_tiles, source = tiles(args.images, args.tiles)
    encoded = [encode_pixels(rgb, "jpeg")[1] for rgb in rgb_tiles]
    buffers = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
    spent = {"pillow": 0.0, "torchvision": 0.0}
    identical = 0
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for data, buffer in zip(encoded, buffers):
            start = time.perf_counter()
            a = decode_pixels("jpg", data)
            middle = time.perf_counter()
            b = decode_jpeg(buffer, mode=ImageReadMode.RGB)
            end = time.perf_counter()
            if round_:
                spent["pillow"] += middle - start
                spent["torchvision"] += end - middle
            else:
                identical += torch.equal(a, b)
    per_tile = {name: 1000 * seconds / (args.rounds * len(encoded)) for name, seconds in spent.items()}
    print(f"{len(encoded)} tiles of 256 px from {source}, q95 4:4:4, {sum(map(len, encoded)) / len(encoded) / 1e3:.1f} kB "
          f"each, {args.rounds} rounds, one thread")
    print(f"ms per tile: Pillow {per_tile['pillow']:.3f}, torchvision {per_tile['torchvision']:.3f}, "
          f"ratio {per_tile['torchvision'] / per_tile['pillow']:.2f}, identical {identical} of {len(encoded)}")


if __name__ == "__main__":
    main()
