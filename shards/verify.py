"""`hipt-shards verify`: re-hash every shard of a folder or URL, decode every sample (region or slide bag),
check every count and the index."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from hipt_e2e.data.embeddings import KIND as BAG_KIND
from hipt_e2e.data.embeddings import decode_bag
from hipt_e2e.data.index import INDEX, ShardIndex, index_file
from hipt_e2e.data.manifest import load_manifest
from hipt_e2e.data.samples import decode_sample
from hipt_e2e.data.storage import child, exists, local_path, open_stream, read_bytes, tar_samples
from hipt_e2e.io import sha256_stream
from hipt_e2e.progress import progress

log = logging.getLogger(__name__)

REQUIRED_FIELDS = ("slide_id", "label", "region_index", "x", "y", "size", "mpp", "grid", "tissue")


def _check_sample(name: str, sample: dict, bags: bool) -> tuple[str | None, int, str | None]:
    """(slide_id, regions held, problem) of one raw sample: a region (pixels or token grid) or a slide's bag."""
    where = f"{name}: sample {sample.get('__key__')}"
    try:
        if bags:
            bag = decode_bag(sample)
            return bag.slide_id, bag.features.shape[0], None
        rgb, record = decode_sample(sample)
    except Exception as exc:
        return None, 0, f"{where}: cannot decode ({type(exc).__name__}: {exc})"
    missing = [field for field in REQUIRED_FIELDS if field not in record]
    if missing:
        return record.get("slide_id"), 0, f"{where}: record lacks {missing}"
    rows, cols = record["grid"]
    if tuple(rgb.shape[1:]) != (record["height"], record["width"]) or len(record["tissue"]) != rows * cols:
        return record["slide_id"], 0, (f"{where}: pixels {rgb.shape} do not match the record "
                                       f"({record['height']}x{record['width']}, grid {rows}x{cols})")
    return record["slide_id"], 1, None


def _check_shard(root: str, shard: dict, bags: bool) -> tuple[list[str], Counter]:
    """Problems of one shard, and the regions it holds per slide."""
    location = child(root, shard["name"])
    if not exists(location):
        return [f"{shard['name']}: missing"], Counter()
    problems = []
    with open_stream(location) as stream:
        digest = sha256_stream(stream)
    if digest != shard["sha256"]:
        problems.append(f"{shard['name']}: sha256 differs from the manifest (altered or truncated)")
    samples: Counter = Counter()  # per slide, as the shard's manifest entry counts them
    regions: Counter = Counter()
    count = 0
    try:
        for sample in tar_samples(location):
            count += 1
            slide_id, held, problem = _check_sample(shard["name"], sample, bags)
            if problem:
                problems.append(problem)
            elif shard["slides"]:  # unlabelled tile shards belong to no slide
                samples[slide_id] += 1
                regions[slide_id] += held
    except Exception as exc:
        problems.append(f"{shard['name']}: unreadable after {count} samples ({type(exc).__name__}: {exc})")
    if count != shard["samples"]:
        problems.append(f"{shard['name']}: {count} samples, manifest says {shard['samples']}")
    if dict(samples) != shard["slides"]:
        problems.append(f"{shard['name']}: per-slide counts {dict(samples)} differ from the manifest {shard['slides']}")
    return problems, regions


def _check_index(root: str, manifest: dict) -> list[str]:
    """Problems of the shard index, which must describe these shards member by member (if there is one)."""
    location = child(root, INDEX)
    if not exists(location):
        log.info("%s: no index (built before it; training makes it on first open)", root)
        return []
    index = ShardIndex.from_bytes(read_bytes(location), location)
    if index.shard_sha256.tolist() != [shard["sha256"] for shard in manifest["shards"]]:
        return [f"{INDEX}: describes other shards than the manifest lists (stale; delete it to rebuild)"]
    problems = []
    for position, shard in enumerate(manifest["shards"]):
        try:
            found = index_file(child(root, shard["name"]))
        except Exception:  # noqa: BLE001 - a missing or unreadable shard is reported by _check_shard
            continue
        listed = index.rows(position)
        wrong = next((mine[0] for mine, theirs in zip(listed, found) if mine != theirs), None)
        if wrong is not None or len(listed) != len(found):
            problems.append(f"{INDEX}: {shard['name']}: differs from the shard's own headers and bytes "
                            f"({f'first at sample {wrong}' if wrong else f'{len(listed)} samples, the shard {len(found)}'})")
    return problems


def verify(root: str | Path) -> list[str]:
    """Every problem found in a shard set, a folder or URL (empty list: all good)."""
    try:
        manifest = load_manifest(root)
    except FileNotFoundError as exc:
        return [str(exc)]
    root = manifest["root"]
    problems: list[str] = []
    totals: Counter = Counter()
    for shard in progress(manifest["shards"], desc="verify", unit="shard"):
        shard_problems, slides = _check_shard(root, shard, manifest.get("kind") == BAG_KIND)
        problems += shard_problems
        totals.update(slides)
    for slide_id, entry in manifest["slides"].items():
        if totals[slide_id] != entry["regions"]:
            problems.append(f"slide {slide_id}: {totals[slide_id]} regions found, manifest says {entry['regions']}")
    problems += _check_index(root, manifest)
    listed = {shard["name"] for shard in manifest["shards"]}
    folder = local_path(root)
    for path in sorted(folder.rglob("shard-*.tar*")) if folder is not None else []:  # a URL lists nothing
        name = path.relative_to(folder).as_posix()
        if name not in listed:
            problems.append(f"{name}: not in the manifest (left over from an interrupted build?)")
    if manifest["samples"] != sum(shard["samples"] for shard in manifest["shards"]):
        problems.append("manifest: total samples differ from the sum over shards")
    return problems
