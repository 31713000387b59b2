"""Reading lineage (hipt_e2e.data.lineage's record), which needs the model code: `read_lineage`, the one
reader, converts the manifests of earlier versions (their recipe settings, `build_args`, resolved as the step
resolved them); and the checks that data fit a model's card.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hipt_e2e.config import Settings
from hipt_e2e.data.embeddings import KIND as BAGS_KIND
from hipt_e2e.data.lineage import (
    PIXEL_INPUTS,
    PIXELS,
    REGION_EMBEDDINGS,
    SLIDE_BAGS,
    TILE_EMBEDDINGS,
    TOKEN_GRIDS,
    Encoder,
    Geometry,
    Lineage,
    Source,
    card_geometry,
    check_geometry,
    pixel_lineage,
)
from hipt_e2e.data.manifest import GRIDS_KIND, load_manifest
from hipt_e2e.errors import UserError
from hipt_e2e.io import sha256_file
from hipt_e2e.models.bundle import (
    card_beside,
    read_card,
    region_architecture,
    tile_architecture,
    tile_normalisation,
    tile_width,
)
from hipt_e2e.models.encoders import RegionModel, TileModel
from hipt_e2e.models.foundation import weights_file


def read_lineage(manifest: str | Path | Mapping) -> Lineage:
    """The lineage of a shard set (a folder, URL or loaded manifest); converted from the recorded
    settings of a set written before lineage was recorded."""
    manifest = load_manifest(manifest)
    if "lineage" in manifest:
        return Lineage.from_dict(manifest["lineage"])
    settings, kind = manifest.get("build_args") or {}, manifest.get("kind")
    if kind in PIXEL_INPUTS:
        return pixel_lineage({"kind": kind, **settings})
    try:
        return _converted_embeddings(kind, settings)
    except (KeyError, TypeError, ValueError):  # bags written by write_slide_bags from other features
        return Lineage(SLIDE_BAGS if kind == BAGS_KIND else str(kind), Geometry())


def _converted_embeddings(kind: str, settings: Mapping[str, Any]) -> Lineage:
    """An embedding set of an earlier version, from the recipe config it recorded (embed_tiles or
    embed_regions) and, while it can be read, the lineage of the set it was made from."""
    shards, model = settings["data"]["shards"], settings["model"]
    before = _readable_lineage(shards)
    source = Source(str(shards), None)
    if kind == GRIDS_KIND:
        arch = tile_architecture(TileModel.from_mapping(_fields_of(TileModel, model)))
        tile = Encoder(arch, _resolved(model["weights"]), _authors_sha256(arch, model["weights"]),
                       normalisation=tile_normalisation(arch, settings["embed"]["normalisation"]))
        return Lineage(TOKEN_GRIDS, dataclasses.replace(before.geometry, width=tile_width(arch)), source, tile)
    if kind != BAGS_KIND:
        raise ValueError(f"no lineage for a {kind!r} set")
    if settings["embed"].get("level") == "tile":
        return Lineage(TILE_EMBEDDINGS, before.geometry, source, before.tile_encoder)
    region = Encoder(region_architecture(RegionModel.from_mapping(_fields_of(RegionModel, model))), _resolved(model["weights"]))
    geometry = dataclasses.replace(before.geometry, width=region.architecture["embed_dim"])
    return Lineage(REGION_EMBEDDINGS, geometry, source, before.tile_encoder, region)


def _fields_of(kind: type[Settings], model: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of a recorded model section that the typed section `kind` has (it held the weights too)."""
    return {key: value for key, value in model.items() if key in {f.name for f in dataclasses.fields(kind)}}


def _readable_lineage(shards: str) -> Lineage:
    """The lineage of the set an old one was made from, while it can be read."""
    try:
        return read_lineage(shards)
    except (OSError, UserError):  # the source has moved or gone: what this set recorded still holds
        return Lineage(PIXELS, Geometry())


def _resolved(weights: str | None) -> str | None:
    return str(Path(weights).resolve()) if weights else None


def _authors_sha256(arch: Mapping[str, Any], weights: str | None) -> str | None:
    """A pretrained tile encoder's weights file by its hash, while the file is there."""
    if "entry" not in arch or not weights:
        return None
    try:
        return sha256_file(weights_file(weights))
    except FileNotFoundError:
        return None


def encoder_record(architecture: Mapping[str, Any], weights: str | Path | None, authors_file: Mapping[str, str] | None = None,
                   normalisation: str | None = None) -> Encoder:
    """An encoder as it embedded: `authors_file` the {path, sha256} a pretrained tile encoder loaded."""
    card = card_beside(weights) if weights else None
    return Encoder(dict(architecture), str(Path(weights).resolve()) if weights else None,
                   authors_file["sha256"] if authors_file else None, str(card) if card else None, normalisation)


def check_card(data: Geometry, data_name: str | Path, card: str | Path | None, width: int | None = None,
               model_name: str = "model.*") -> None:
    """Refuse data that do not fit a model: the geometry its card records (when it has one) and the width
    of the embeddings it takes (when given)."""
    model = card_geometry(read_card(card)[0]) if card else Geometry()
    check_geometry(data, data_name, dataclasses.replace(model, width=width), card or model_name)


def check_weights(weights: Mapping[str, str | Path | None], data: Geometry, data_name: str | Path) -> None:
    """Refuse data that do not fit the model card beside any of these weights files (stage -> path)."""
    for path in weights.values():
        if path and (card := card_beside(path)) is not None:
            check_card(data, data_name, card)
