"""A shard set's manifest.json: where the shards are and what they hold (made by every writer alike)."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from hipt_e2e.data.storage import child, children, local_path, parent, read_bytes

MANIFEST = "manifest.json"
FORMAT = "hipt-e2e-shards"  # every shard set's manifest: format, version, kind, ...
FORMAT_VERSION = 1
GRIDS_KIND = "token_grids"  # the kind of embed_tiles' output: one token grid [D, rows, cols] per region


def load_manifest(root: str | Path | Mapping) -> dict:
    """The manifest of a shard set (a folder or URL, or its manifest.json; one already loaded as it is), its
    "root" where the shards are."""
    if isinstance(root, Mapping):
        return dict(root)
    text = str(root)
    path = local_path(text)
    if not text.endswith(MANIFEST) or (path is not None and path.is_dir()):
        text = child(text, MANIFEST)
    try:
        manifest = json.loads(read_bytes(text))
    except FileNotFoundError:
        raise FileNotFoundError(f"{text}: no manifest; is this a finished `hipt-shards build` output "
                                "(or a set of parts that still needs `hipt-shards merge`)?") from None
    manifest["root"] = parent(text)
    return manifest


def class_counts(slides: Mapping[str, Mapping]) -> dict[str, dict[str, int]]:
    """Manifest `class_counts` from its `slides` entries: slides and regions per label (sorted)."""
    counts: dict[str, dict[str, int]] = {"slides": {}, "regions": {}}
    for entry in slides.values():
        if entry["label"] is not None:
            counts["slides"][entry["label"]] = counts["slides"].get(entry["label"], 0) + 1
            counts["regions"][entry["label"]] = counts["regions"].get(entry["label"], 0) + entry["regions"]
    return {level: dict(sorted(c.items())) for level, c in counts.items()}


def shard_set_manifest(kind: str, build_args: Mapping, classes: Sequence[str], slides: Mapping[str, Mapping],
                       shards: Sequence[Mapping], *, inputs: int, written: int,
                       skipped: Sequence[Mapping] = (), n_skipped: int = 0, lineage: Mapping | None = None) -> dict:
    """The manifest of a finished shard set: `inputs` = `written` + `n_skipped`, `lineage` a Lineage.as_dict(),
    `build_args` the settings a rerun must repeat."""
    return {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind, "build_args": dict(build_args),
            **({"lineage": dict(lineage)} if lineage is not None else {}),
            "classes": list(classes), "class_counts": class_counts(slides), "inputs": inputs, "written": written,
            "n_skipped": n_skipped, "samples": sum(shard["samples"] for shard in shards), "slides": dict(slides),
            "shards": list(shards), "skipped": list(skipped)}


def shard_urls(source: str | Path | Mapping | Sequence[str]) -> list[str]:
    """Shard URLs in build order from a shard directory, a manifest, or the user's own list, taken as it is (a
    manifest's names only resolve inside its own folder or URL)."""
    if isinstance(source, (list, tuple)):
        return [str(url) for url in source]
    manifest = load_manifest(source)
    return children(manifest["root"], [shard["name"] for shard in manifest["shards"]])
