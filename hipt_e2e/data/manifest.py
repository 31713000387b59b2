"""Reading a shard set's manifest.json: where the shards are and what they hold."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

MANIFEST = "manifest.json"


def load_manifest(root: str | Path) -> dict:
    """The manifest of a shard directory (or the manifest file itself), with a clear error when absent."""
    path = Path(root)
    if path.is_dir():
        path = path / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path}: no manifest; is this a finished `hipt-shards build` output "
                                "(or a set of parts that still needs `hipt-shards merge`)?")
    manifest = json.loads(path.read_text())
    manifest["root"] = str(path.parent)
    return manifest


def class_counts(slides: Mapping[str, Mapping]) -> dict[str, dict[str, int]]:
    """Manifest `class_counts` from its `slides` entries: slides and regions per label (sorted)."""
    counts: dict[str, dict[str, int]] = {"slides": {}, "regions": {}}
    for entry in slides.values():
        if entry["label"] is not None:
            counts["slides"][entry["label"]] = counts["slides"].get(entry["label"], 0) + 1
            counts["regions"][entry["label"]] = counts["regions"].get(entry["label"], 0) + entry["regions"]
    return {level: dict(sorted(c.items())) for level, c in counts.items()}


def shard_urls(source: str | Path | Sequence[str]) -> list[str]:
    """Shard URLs in build order from a shard directory, a manifest, or an explicit list of paths/URLs.

    URLs (http://, pipe:, ...) are passed to webdataset as they are; nothing else is fetched.
    """
    if isinstance(source, (list, tuple)):
        return [str(url) for url in source]
    manifest = load_manifest(source)
    return [str(Path(manifest["root"]) / shard["name"]) for shard in manifest["shards"]]
