"""`hipt-shards verify`: re-hash every shard, decode every sample, check every count."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from hipt_e2e.data.manifest import load_manifest
from hipt_e2e.data.samples import decode_sample
from hipt_e2e.io import sha256_file

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("slide_id", "label", "region_index", "x", "y", "size", "mpp", "grid", "tissue")


def _check_sample(name: str, sample: dict) -> tuple[str | None, str | None]:
    """(slide_id, problem) of one raw sample."""
    try:
        rgb, record = decode_sample(sample)
    except Exception as exc:
        return None, f"{name}: sample {sample.get('__key__')}: cannot decode ({type(exc).__name__}: {exc})"
    missing = [field for field in REQUIRED_FIELDS if field not in record]
    if missing:
        return record.get("slide_id"), f"{name}: sample {sample['__key__']}: record lacks {missing}"
    rows, cols = record["grid"]
    if tuple(rgb.shape[1:]) != (record["height"], record["width"]) or len(record["tissue"]) != rows * cols:
        return record["slide_id"], (f"{name}: sample {sample['__key__']}: pixels {rgb.shape} do not match the "
                                    f"record ({record['height']}x{record['width']}, grid {rows}x{cols})")
    return record["slide_id"], None


def _check_shard(root: Path, shard: dict) -> tuple[list[str], Counter]:
    path = root / shard["name"]
    if not path.exists():
        return [f"{shard['name']}: missing"], Counter()
    problems = []
    if sha256_file(path) != shard["sha256"]:
        problems.append(f"{shard['name']}: sha256 differs from the manifest (altered or truncated)")
    slides: Counter = Counter()
    count = 0
    try:
        for sample in wds.tariterators.tarfile_samples([{"url": str(path)}]):
            count += 1
            slide_id, problem = _check_sample(shard["name"], sample)
            if problem:
                problems.append(problem)
            elif shard["slides"]:  # unlabelled tile shards belong to no slide
                slides[slide_id] += 1
    except Exception as exc:
        problems.append(f"{shard['name']}: unreadable after {count} samples ({type(exc).__name__}: {exc})")
    if count != shard["samples"]:
        problems.append(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
    if dict(slides) != shard["slides"]:
        problems.append(f"{shard['name']}: per-slide counts {dict(slides)} differ from the manifest {shard['slides']}")
    return problems, slides


def verify(root: str | Path) -> list[str]:
    """Every problem found in a shard directory (empty list: all good)."""
    try:
        manifest = load_manifest(root)
    except FileNotFoundError as exc:
        return [str(exc)]
    root = Path(manifest["root"])
    problems: list[str] = []
    totals: Counter = Counter()
    for shard in tqdm(manifest["shards"], desc="verify", unit="shard"):
        shard_problems, slides = _check_shard(root, shard)
        problems += shard_problems
        totals.update(slides)
    for slide_id, entry in manifest["slides"].items():
        if totals[slide_id] != entry["regions"]:
            problems.append(f"slide {slide_id}: {totals[slide_id]} regions found, manifest says {entry['regions']}")
    listed = {shard["name"] for shard in manifest["shards"]}
    for path in sorted(root.rglob("shard-*.tar*")):
        name = path.relative_to(root).as_posix()
        if name not in listed:
            problems.append(f"{name}: not in the manifest (left over from an interrupted build?)")
    if manifest["samples"] != sum(shard["samples"] for shard in manifest["shards"]):
        problems.append("manifest: total samples differ from the sum over shards")
    return problems
