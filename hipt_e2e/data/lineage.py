"""Typed lineage: what a shard set holds (kind, geometry) and what made it (source set, encoders), in every
manifest and model card, carried forward from step to step. Writers record `Lineage.as_dict()`;
`hipt_e2e.lineage.read_lineage` is the one reader. `check_geometry` is the one test that data fit a model:
a mismatch is refused, never resampled. A `Geometry` may be partly unknown (a `.pt` set's regions have no
fixed size); `hipt_e2e.data.tiling.RegionGeometry` is the complete recipe for cutting regions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hipt_e2e.data.manifest import MANIFEST
from hipt_e2e.data.storage import child, is_url, read_bytes
from hipt_e2e.data.tiling import RegionGeometry
from hipt_e2e.errors import InputError

PIXELS = "pixels"  # hipt-shards build: regions (or .pt tiles) as image pixels
TOKEN_GRIDS = "token_grids"  # embed_tiles: one grid of tile embeddings per region
REGION_EMBEDDINGS = "region_embeddings"  # embed_regions: one bag of region embeddings per slide
TILE_EMBEDDINGS = "tile_embeddings"  # embed_regions embed.level=tile: one bag of tile embeddings per slide
SLIDE_BAGS = "slide_bags"  # bags written by write_slide_bags from features made elsewhere
SLIDE_EMBEDDINGS = "slide_embeddings"  # embed_slides: one slide encoder embedding per slide
PIXEL_INPUTS = ("slides", "images", "pt")  # the manifest kinds of hipt-shards build


@dataclass(frozen=True)
class Geometry:
    """Region and tile size in pixels at mpp um/px, and the width of the embeddings; None where unknown."""

    region_px: int | None = None
    tile_px: int | None = None
    mpp: float | None = None
    width: int | None = None  # embedding width of a set of embeddings (None: pixels)

    @property
    def grid(self) -> int | None:  # tiles per region side
        return self.region_px // self.tile_px if self.region_px and self.tile_px else None

    def describe(self) -> str:
        """E.g. '128 px regions of 32 px tiles at 0.5 um/px, 48-d embeddings'."""
        text = f"{self.tile_px} px tiles" if self.tile_px else ""
        if self.region_px:
            text = f"{self.region_px} px regions" + (f" of {text}" if text else "")
        text += f" at {self.mpp:g} um/px" if self.mpp else ""
        text += f", {self.width}-d embeddings" if self.width else ""
        return text.strip(" ,") or "no recorded geometry"

    def differs_from(self, other: Geometry) -> bool:
        """True when a size both record differs (unknown sizes are not compared)."""
        pairs = ((getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))
        return any(a is not None and b is not None and not math.isclose(a, b, rel_tol=1e-6) for a, b in pairs)

    @classmethod
    def of_regions(cls, regions: RegionGeometry) -> Geometry:
        return cls(regions.region_px, regions.tile_px, regions.mpp)

    def pixel_fields(self) -> dict[str, Any]:
        """The card keys of a model trained at this geometry (hipt_e2e.models.bundle)."""
        return {"region_px": self.region_px, "tile_px": self.tile_px, "mpp": self.mpp}


@dataclass(frozen=True)
class Encoder:
    """An encoder that embedded a set: its resolved architecture and the weights it ran with."""

    architecture: Mapping[str, Any]
    weights: str | None = None  # resolved path; None: randomly initialised
    sha256: str | None = None  # a pretrained encoder's authors' file (the card loads exactly that file)
    card: str | None = None  # the model card beside the weights, when they came from one
    normalisation: str | None = None  # a tile encoder's pixel normalisation


@dataclass(frozen=True)
class Source:
    """The shard set a set was made from."""

    shards: str  # folder or URL
    manifest_sha256: str | None  # of its manifest.json; None when converted from an earlier version


@dataclass(frozen=True)
class Lineage:
    kind: str
    geometry: Geometry
    source: Source | None = None
    tile_encoder: Encoder | None = None
    region_encoder: Encoder | None = None
    slide_encoder: Encoder | None = None

    def as_dict(self) -> dict[str, Any]:
        """The manifest's and card's "lineage" entry (with the derived tile grid, for readers); without a slide
        encoder, without its key, so the other steps write their manifests as before it existed."""
        entry = {**dataclasses.asdict(self), "geometry": {**dataclasses.asdict(self.geometry), "grid": self.geometry.grid}}
        if self.slide_encoder is None:
            del entry["slide_encoder"]
        return entry

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any]) -> Lineage:
        def part(kind: type, value: Mapping[str, Any] | None) -> Any:
            names = {field.name for field in dataclasses.fields(kind)}
            return None if value is None else kind(**{k: v for k, v in value.items() if k in names})

        return cls(entry["kind"], part(Geometry, entry["geometry"]), part(Source, entry.get("source")),
                   part(Encoder, entry.get("tile_encoder")), part(Encoder, entry.get("region_encoder")),
                   part(Encoder, entry.get("slide_encoder")))


# ------------------------------------------------------------------------------------------ writing
def pixel_lineage(settings: Mapping[str, Any]) -> Lineage:
    """The lineage of a hipt-shards build; `.pt` regions have no fixed size and their resolution is slide_mpp."""
    if settings.get("kind") == "pt":
        return Lineage(PIXELS, Geometry(None, settings.get("tile_px"), settings.get("slide_mpp")))
    return Lineage(PIXELS, Geometry(settings.get("region_px"), settings.get("tile_px"), settings.get("mpp")))


def source_of(manifest: Mapping[str, Any]) -> Source:
    """A loaded manifest's set as the source of another: its location (a local one absolute), its manifest's sha256."""
    root = str(manifest["root"])
    digest = hashlib.sha256(read_bytes(child(root, MANIFEST))).hexdigest()
    return Source(root if is_url(root) else str(Path(root).resolve()), digest)


# ------------------------------------------------------------------------------------------ checking
def card_geometry(card: Mapping[str, Any]) -> Geometry:
    """The geometry a model card says its model was trained at."""
    return Geometry(card.get("region_px"), card.get("tile_px"), card.get("mpp"))


def check_geometry(data: Geometry, data_name: str | Path, model: Geometry, model_name: str | Path) -> None:
    """Refuse data whose geometry differs from the model's where both record it, naming both."""
    if data.differs_from(model):
        raise InputError(data_name, f"{data.describe()}; the model ({model_name}) was trained on {model.describe()}")
