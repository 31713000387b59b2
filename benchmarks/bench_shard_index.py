"""Opening a shard set for random access: the index (manifest + index.npz) against the scan it replaced
(every tar header walked, every region's JSON record read), and the bytes an end-to-end step reads over
HTTP against the shard set's size.

1. 10 k regions in 100 real shards (tiny PNG regions; the members' number and kind as a pixel shard
   set's): open time per region, index against scan, warm page cache, best of --rounds.
2. 1 M regions (10 k slides x 100 regions in 10 k shards), synthetic index and manifest (no shards are
   needed to open): open time per region and the memory the opened reader holds.
3. A shard set of 24 synthetic slides (8 regions of 256 px each) served over HTTP on 127.0.0.1: bytes
   read to open it and by one training step (1 slide x 4 regions) against the set's size.

Run: `python benchmarks/bench_shard_index.py [--rounds R]`. Last line: `index open us/region at 1M: X,
scan/index at 10k: Y`.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import tarfile
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hipt_e2e.data.index import ShardIndex, write_index  # noqa: E402
from hipt_e2e.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, load_manifest  # noqa: E402
from hipt_e2e.data.regions import ShardRegions  # noqa: E402
from hipt_e2e.data.synthetic import make_dataset  # noqa: E402
from hipt_e2e.io import sha256_file  # noqa: E402
from shards.build import BuildSettings, build  # noqa: E402
from tests.http_server import ShardServer  # noqa: E402


def manifest_for(slides: dict[str, int], shards: list[dict]) -> dict:
    entries = {slide: {"label": "a", "patient_id": slide, "split": None, "regions": count, "shards": []}
               for slide, count in slides.items()}
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": "images", "build_args": {"tile_px": 16},
            "classes": ["a"], "class_counts": {}, "inputs": len(slides), "written": len(slides), "n_skipped": 0,
            "samples": sum(slides.values()), "slides": entries, "shards": shards, "skipped": []}


def real_set(root: Path, slides: int, regions: int, per_shard: int) -> Path:
    """slides x regions tiny PNG regions with full JSON records, per_shard regions per tar."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 120, 180)).save(buffer, format="PNG")
    png, shards = buffer.getvalue(), []
    samples = [(f"s{s:05d}", r) for s in range(slides) for r in range(regions)]
    for start in range(0, len(samples), per_shard):
        name = f"shard-{start // per_shard:06d}.tar"
        with wds.TarWriter(str(root / name), encoder=False, mtime=0) as tar:
            for slide, region in samples[start:start + per_shard]:
                record = {"slide_id": slide, "label": "a", "label_index": 0, "patient_id": slide, "region_index": region,
                          "x": region * 32, "y": 0, "size": 32, "mpp": 0.5, "grid": [2, 2], "tissue": [1.0] * 4,
                          "height": 32, "width": 32, "tile_px": 16}
                tar.write({"__key__": f"i{slide}_r{region:06d}", "png": png, "json": json.dumps(record).encode()})
        batch = samples[start:start + per_shard]
        shards.append({"name": name, "samples": len(batch), "bytes": (root / name).stat().st_size,
                       "sha256": sha256_file(root / name), "slides": {}, "slide_continues": False})
    write_index(root, shards)
    (root / MANIFEST).write_text(json.dumps(manifest_for({f"s{s:05d}": regions for s in range(slides)}, shards)))
    return root


def scan_open(root: Path) -> dict:
    """The reader before the index: every tar header walked, every JSON record read."""
    manifest = load_manifest(root)
    slides: dict[str, list] = {}
    for shard in manifest["shards"]:
        path = Path(manifest["root"]) / shard["name"]
        with tarfile.open(path, "r:") as tar, open(path, "rb") as handle:
            for member in tar:
                if member.name.endswith(".json"):
                    handle.seek(member.offset_data)
                    record = json.loads(handle.read(member.size))
                    slides.setdefault(record["slide_id"], []).append((record["region_index"], member.offset_data))
    return slides


def best_seconds(action, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def synthetic_million(root: Path, slides: int = 10_000, regions: int = 100) -> Path:
    n = slides * regions
    rng = np.random.default_rng(0)
    offsets = np.stack([np.arange(n) * 20_000 + 512, np.arange(n) * 20_000 + 2048], axis=1).astype(np.int64)
    index = ShardIndex(
        shard=np.repeat(np.arange(slides, dtype=np.int32), regions), key=np.array([f"i{i:07d}_r{i % regions:06d}".encode()
                                                                                   for i in range(n)]),
        slide=np.repeat(np.arange(slides, dtype=np.int32), regions), slide_ids=np.array([f"s{s:05d}" for s in range(slides)]),
        region_index=np.tile(np.arange(regions, dtype=np.int32), slides), exts=np.array(["jpg", "json"]),
        offset=offsets, size=np.full((n, 2), 1000, dtype=np.int64),
        crc32=rng.integers(0, 2**32, size=(n, 2), dtype=np.uint64).astype(np.uint32),
        shard_sha256=np.array([f"{s:064x}" for s in range(slides)]))
    index.write(root)
    shards = [{"name": f"shard-{s:06d}.tar", "samples": regions, "bytes": regions * 20_000, "sha256": f"{s:064x}",
               "slides": {f"s{s:05d}": regions}, "slide_continues": False} for s in range(slides)]
    (root / MANIFEST).write_text(json.dumps(manifest_for({f"s{s:05d}": regions for s in range(slides)}, shards)))
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "10k").mkdir()
        small = real_set(Path(tmp) / "10k", slides=100, regions=100, per_shard=100)
        n = load_manifest(small)["samples"]
        scan = best_seconds(lambda: scan_open(small), args.rounds)
        indexed = best_seconds(lambda: ShardRegions(small, regions_per_slide=4, seed=0), args.rounds)
        print(f"10k regions: scan {scan / n * 1e6:.1f} us/region, index {indexed / n * 1e6:.2f} us/region, "
              f"ratio {scan / indexed:.0f}")

        big = Path(tmp) / "1M"
        big.mkdir()
        synthetic_million(big)
        million = best_seconds(lambda: ShardRegions(big, regions_per_slide=4, seed=0), args.rounds)
        tracemalloc.start()
        reader = ShardRegions(big, regions_per_slide=4, seed=0)
        held, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        n_big = len(reader.index)
        print(f"1M regions: index {million / n_big * 1e6:.2f} us/region ({million:.2f} s), reader holds "
              f"{held / 2**20:.0f} MiB ({held / n_big:.0f} B/region)")

        slides = make_dataset(Path(tmp) / "slides", slides_per_class=12, size=512, region_px=256)
        build(BuildSettings.from_mapping({"kind": "images", "input": str(slides), "labels": str(slides / "labels.csv"),
                                          "out": str(Path(tmp) / "http"),
                                          "slide_mpp": 0.5, "region_px": 256, "tile_px": 32, "encoding": "jpeg", "shard_bytes": 2_000_000}))
        total = sum(s["bytes"] for s in load_manifest(Path(tmp) / "http")["shards"])
        with ShardServer(Path(tmp)) as server:
            remote = ShardRegions(f"{server.url}/http", regions_per_slide=4, seed=0)
            opened = server.bytes_sent
            slide = sorted(remote.slides)[0]
            remote[remote.sample(slide, 0)]
            step = server.bytes_sent - opened
        print(f"HTTP: set {total / 1e6:.2f} MB; opening read {opened / 1e3:.1f} kB (manifest + index), one step "
              f"(1 slide x 4 regions of 256 px) {step / 1e3:.1f} kB = {step / total:.2%} of the set")
    print(f"index open us/region at 1M: {million / n_big * 1e6:.2f}, scan/index at 10k: {scan / indexed:.0f}")


if __name__ == "__main__":
    main()
