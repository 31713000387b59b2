"""`hipt-shards merge`: combine the manifests of `--part i/n` builds into one."""
from __future__ import annotations

import json
import re
from pathlib import Path

from hipt_e2e.data.index import open_index, write_index
from hipt_e2e.data.manifest import class_counts
from hipt_e2e.io import atomic_write_json
from shards.build import BuildError, build_args

PART = re.compile(r"part-(\d{4})-of-(\d{4})$")


def merge(out: str | Path) -> dict:
    """Write OUT/manifest.json over all part-i-of-n folders; every part must be complete and alike."""
    out = Path(out)
    parts = sorted(p for p in out.iterdir() if p.is_dir() and PART.match(p.name))
    if not parts:
        raise BuildError(f"{out}: no part-i-of-n folders to merge")
    count = int(PART.match(parts[0].name).group(2))
    expected = [f"part-{i:04d}-of-{count:04d}" for i in range(count)]
    missing = [name for name in expected if not (out / name / "manifest.json").exists()]
    if missing or [p.name for p in parts] != expected:
        raise BuildError(f"{out}: parts missing or unfinished: {missing or sorted(set(p.name for p in parts) ^ set(expected))}")
    manifests = [json.loads((part / "manifest.json").read_text()) for part in parts]
    first = manifests[0]
    for part, manifest in zip(parts, manifests):
        if build_args(manifest["build_args"]) != build_args(first["build_args"]):
            raise BuildError(f"{part}: built with other settings than {parts[0]}")
    merged = {key: first[key] for key in ("format", "version", "kind", "build_args", "lineage", "classes") if key in first}
    merged.update(inputs=0, written=0, n_skipped=0, samples=0, slides={}, shards=[], skipped=[])
    rows = {}  # each part's index rows, by the names the merged manifest gives its shards
    for part, manifest in zip(parts, manifests):
        for key in ("inputs", "written", "n_skipped", "samples"):
            merged[key] += manifest[key]
        for slide_id, entry in manifest["slides"].items():
            merged["slides"][slide_id] = {**entry, "shards": [f"{part.name}/{s}" for s in entry["shards"]]}
        merged["shards"] += [{**shard, "name": f"{part.name}/{shard['name']}"} for shard in manifest["shards"]]
        merged["skipped"] += manifest["skipped"]
        index = open_index({**manifest, "root": str(part)})
        rows.update({f"{part.name}/{shard['name']}": index.rows(n) for n, shard in enumerate(manifest["shards"])})
    merged["class_counts"] = class_counts(merged["slides"])
    write_index(out, merged["shards"], rows)
    atomic_write_json(out / "manifest.json", merged)
    return merged
