"""Storage benchmark: the lab's one-float32-.pt-per-tile layout against this project's shards.

Same real tiles (256 px crops of the lymphoma images) stored two ways, read in one run, one core:
  - `.pt`: one float32 [3, 256, 256] file per tile, read by a torch Dataset + DataLoader;
  - shards: `hipt-shards build pt` of exactly those files (JPEG q95, q90, PNG), read by TileStream.
Bytes on disk per tile, and decoded tiles/s with a warm page cache and after evicting the files from
the page cache (posix_fadvise DONTNEED), best of --rounds passes each. A last row decodes the q95 JPEG
bytes already in memory: the ceiling of any reader that decodes JPEG on this core.
Run: `python benchmarks/bench_storage.py [--tiles N] [--rounds R]`.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hipt_e2e.config import setup_logging  # noqa: E402
from hipt_e2e.data import TileStream  # noqa: E402
from hipt_e2e.data.samples import decode_pixels, pixel_entry  # noqa: E402
from shards.build import BuildSettings, build  # noqa: E402
from tests.conftest import LYMPHOMA, read_rgb  # noqa: E402

log = logging.getLogger("bench_storage")


class PtTiles(Dataset):
    def __init__(self, files: list[Path]):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.load(self.files[index], weights_only=True)


def write_pt_tiles(out: Path, count: int) -> list[Path]:
    """Two 256 px crops (top-left, bottom-right) per real image, as float32 0-1 tensors."""
    out.mkdir(parents=True)
    files = []
    for image_path in sorted(LYMPHOMA.glob("*/*.png")):
        rgb = torch.from_numpy(read_rgb(image_path)).permute(2, 0, 1)
        for name, crop in (("tl", rgb[:, :256, :256]), ("br", rgb[:, -256:, -256:])):
            path = out / f"{image_path.parent.name}_{image_path.stem}_{name}.pt"
            torch.save(crop.float() / 255, path)
            files.append(path)
            if len(files) == count:
                return files
    return files


def evict(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def tiles_per_second(loader, expected: int) -> float:
    start, count = time.perf_counter(), 0
    for _ in loader:
        count += 1
    assert count == expected, (count, expected)
    return count / (time.perf_counter() - start)


def measure(paths: list[Path], loader, expected: int, rounds: int) -> tuple[float, float]:
    """(warm, cold) tiles/s, each the best of ``rounds`` passes."""
    tiles_per_second(loader, expected)  # warm the page cache
    warm = max(tiles_per_second(loader, expected) for _ in range(rounds))
    cold = []
    for _ in range(rounds):
        evict(paths)
        cold.append(tiles_per_second(loader, expected))
    return warm, max(cold)


def decode_only(shard_files: list[Path], rounds: int) -> float:
    """Tiles/s of decoding the shards' pixel entries from memory (no file system, no stream)."""
    samples = wds.tariterators.tarfile_samples([{"url": str(p)} for p in shard_files])
    encoded = [(ext, sample[ext]) for sample in samples for ext in [pixel_entry(sample)]]
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for ext, data in encoded:
            decode_pixels(ext, data)
        best = max(best, len(encoded) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=int, default=748)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    setup_logging()
    torch.set_num_threads(1)
    if not LYMPHOMA.is_dir():
        sys.exit(f"needs the lymphoma images at {LYMPHOMA}")
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        tmp = Path(tmp)
        files = write_pt_tiles(tmp / "pt", args.tiles)
        layouts = {"float32 .pt per tile (Dataset + DataLoader)": (files, DataLoader(PtTiles(files), batch_size=None))}
        for encoding, quality in (("jpeg", 95), ("jpeg", 90), ("png", 95)):
            out = tmp / f"shards-{encoding}-{quality}"
            manifest = build(BuildSettings.from_mapping({"kind": "pt", "input": str(tmp / "pt"), "out": str(out), "tile_px": 256,
                                                         "encoding": encoding, "quality": quality, "shard_bytes": 200_000_000}))
            shard_files = [out / s["name"] for s in manifest["shards"]]
            label = f"shards, {encoding}{f' q{quality}' if encoding == 'jpeg' else ''} (TileStream)"
            layouts[label] = (shard_files, DataLoader(TileStream(out), batch_size=None))
        rows = []
        for label, (paths, loader) in layouts.items():
            size = sum(p.stat().st_size for p in paths) / len(files)
            rows.append((label, size, *measure(paths, loader, len(files), args.rounds)))
        q95_files, _ = layouts["shards, jpeg q95 (TileStream)"]
        ceiling = decode_only(q95_files, args.rounds)
    base = rows[0]
    print(f"\n{len(files)} real 256 px tiles, 1 core, {platform.processor() or platform.machine()}, "
          f"torch {torch.__version__}\n")
    print("| layout | bytes/tile | vs .pt | tiles/s warm | tiles/s cold | warm vs .pt | cold vs .pt |")
    print("|---|---|---|---|---|---|---|")
    for label, size, warm, cold in rows:
        print(f"| {label} | {size:,.0f} | {base[1] / size:.1f}x fewer | {warm:,.0f} | {cold:,.0f} | "
              f"{warm / base[2]:.2f}x | {cold / base[3]:.2f}x |")
    print(f"| jpeg q95 decode only, bytes in memory (decode_pixels) | - | - | {ceiling:,.0f} | - | "
          f"{ceiling / base[2]:.2f}x | - |")


if __name__ == "__main__":
    main()
