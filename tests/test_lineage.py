"""Typed lineage (hipt_e2e.data.lineage, hipt_e2e.lineage): recorded by build -> embed_tiles -> embed_regions,
converted from the manifests of earlier versions, and the geometry refusal: a model given data of another
geometry than it was trained on refuses them, naming both (hipt-predict, rescore, e2e from weights, embedding)."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from hipt_e2e.data.embeddings import SlideBag, write_slide_bags
from hipt_e2e.data.lineage import PIXELS, REGION_EMBEDDINGS, SLIDE_BAGS, TOKEN_GRIDS, Geometry, Lineage
from hipt_e2e.data.manifest import GRIDS_KIND, load_manifest
from hipt_e2e.data.regions import ShardRegions
from hipt_e2e.errors import InputError
from hipt_e2e.evaluation.splits import Fold, write_splits
from hipt_e2e.lineage import read_lineage
from hipt_e2e.models import model_preset, vit256
from hipt_e2e.models.bundle import hipt_from, tile_architecture, write_card
from hipt_e2e.models.encoders import TileModel
from hipt_e2e.training.checkpointing import export_safetensors
from hipt_e2e.training.e2e import E2EModel, architecture
from tests.test_dino_recipes import run_recipe

TRAINED = "128 px regions of 32 px tiles at 0.5 um/px"  # the tiny e2e demo's geometry (the `shards` fixture)
OTHER = "256 px regions of 64 px tiles at 0.5 um/px"


@pytest.fixture(scope="module")
def other_shards(e2e_slides: Path, tmp_path_factory) -> Path:
    """The e2e slides at another geometry: one 256 px region of 4 x 4 tiles of 64 px per slide."""
    from shards.build import BuildSettings, build

    out = tmp_path_factory.mktemp("other") / "shards"
    build(BuildSettings.from_mapping({"kind": "images", "input": str(e2e_slides), "labels": str(e2e_slides / "labels.csv"), "out": str(out),
                                      "slide_mpp": 0.5, "region_px": 256, "tile_px": 64, "min_tissue": 0.0, "encoding": "png"}))
    return out


@pytest.fixture(scope="module")
def e2e_run(other_shards: Path, tmp_path_factory) -> Path:
    """A finished run's folder as e2e writes it, its fold model (random weights) trained at the demo's geometry,
    its config naming `other_shards` (as if the user pointed it there)."""
    run = tmp_path_factory.mktemp("run")
    arch = architecture(E2EModel())
    export_safetensors(hipt_from(arch, 2, tile_px=32, normalisation="hipt"), run / "fold_0" / "best_model.safetensors")
    write_card(run / "fold_0" / "best_model.safetensors", {
        "kind": "hipt", "source": "e2e", "architecture": arch, "classes": ["class_a", "class_b"],
        "normalisation": "hipt", "tile_px": 32, "region_px": 128, "mpp": 0.5, "head": "slide"})
    infos = ShardRegions(other_shards, regions_per_slide=None, seed=0).infos()
    ids = [info.slide_id for info in infos]
    write_splits(run / "splits.csv", infos, [Fold(0, tuple(ids[1::2]), (), tuple(ids[::2]))])
    (run / "config.yaml").write_text(yaml.safe_dump({"data": {"shards": str(other_shards)}, "seed": 0}))
    return run


@pytest.fixture(scope="module")
def tile_export(tmp_path_factory) -> Path:
    """A tiny tile encoder as a DINO run exports it: weights and a card trained on 32 px tiles at 0.5 um/px."""
    path = tmp_path_factory.mktemp("vit256") / "backbone.safetensors"
    export_safetensors(vit256(**model_preset("tiny")["tile"]), path)
    write_card(path, {"kind": "tile_encoder", "architecture": tile_architecture(TileModel(preset="tiny")),
                      "normalisation": "hipt", "tile_px": 32, "mpp": 0.5})
    return path


def refusal(data: Path, model: Path | str, found: str = OTHER, trained: str = TRAINED) -> str:
    return re.escape(f"{data}: {found}; the model ({model}) was trained on {trained}")


def test_predict_refuses_shards_of_another_geometry(other_shards: Path, e2e_run: Path, tmp_path: Path) -> None:
    from hipt_e2e.inference.predict import main

    with pytest.raises(InputError, match=refusal(other_shards, e2e_run)):
        main([str(other_shards), "input_kind=shards", f"model.card={e2e_run}", f"out={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_rescore_refuses_shards_of_another_geometry(e2e_run: Path, other_shards: Path, tmp_path: Path) -> None:
    from hipt_e2e.training.rescore import RescoreSettings, rescore

    with pytest.raises(InputError, match=refusal(other_shards, e2e_run / "fold_0")):
        rescore(e2e_run, tmp_path / "out", RescoreSettings(tta="none"))


def test_e2e_from_weights_refuses_shards_of_another_geometry(other_shards: Path, tile_export: Path,
                                                             tmp_path: Path) -> None:
    from tests.test_e2e import load_recipe, settings

    card = tile_export.parent / "model_card.json"
    with pytest.raises(InputError, match=refusal(other_shards, card, trained="32 px tiles at 0.5 um/px")):
        load_recipe().main(settings(other_shards, tmp_path / "run", f"model.weights.tile={tile_export}"))


def test_embedding_refuses_data_the_encoder_was_not_trained_on(shards: Path, other_shards: Path, tile_export: Path,
                                                               tmp_path: Path) -> None:
    card = tile_export.parent / "model_card.json"
    with pytest.raises(InputError, match=refusal(other_shards, card, trained="32 px tiles at 0.5 um/px")):
        run_recipe("embed_tiles", f"data.shards={other_shards}", f"model.weights={tile_export}", f"out={tmp_path / 'g'}")
    run_recipe("embed_tiles", f"data.shards={shards}", f"model.weights={tile_export}", f"out={tmp_path / 'grids'}")
    # token grids of 48-d tile embeddings into a region encoder that takes 12
    with pytest.raises(InputError, match=refusal(tmp_path / "grids", "the region encoder (model.*)",
                                                 f"{TRAINED}, 48-d embeddings", "12-d embeddings")):
        run_recipe("embed_regions", f"data.shards={tmp_path / 'grids'}", "model.region.in_dim=12",
                   f"out={tmp_path / 'bags'}")


def test_lineage_is_recorded_along_build_embed_tiles_embed_regions(shards: Path, tile_export: Path,
                                                                   tmp_path: Path) -> None:
    pixels = read_lineage(shards)
    assert pixels.kind == PIXELS and pixels.geometry == Geometry(128, 32, 0.5) and pixels.geometry.grid == 4
    run_recipe("embed_tiles", f"data.shards={shards}", f"model.weights={tile_export}", f"out={tmp_path / 'grids'}")
    run_recipe("embed_regions", f"data.shards={tmp_path / 'grids'}", f"out={tmp_path / 'bags'}")

    grids, bags = read_lineage(tmp_path / "grids"), read_lineage(tmp_path / "bags")
    manifest_sha256 = hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert grids.kind == TOKEN_GRIDS and grids.geometry == Geometry(128, 32, 0.5, 48)
    assert (grids.source.shards, grids.source.manifest_sha256) == (str(shards.resolve()), manifest_sha256)
    tile = grids.tile_encoder
    assert tile.architecture == tile_architecture(TileModel(preset="tiny")) and tile.sha256 is None
    assert (tile.weights, tile.card, tile.normalisation) == (
        str(tile_export.resolve()), str(tile_export.parent / "model_card.json"), "hipt")
    assert bags.kind == REGION_EMBEDDINGS and bags.geometry == Geometry(128, 32, 0.5, 24)
    assert bags.source.shards == str((tmp_path / "grids").resolve()) and bags.tile_encoder == tile
    assert bags.region_encoder.architecture == model_preset("tiny")["region"] and bags.region_encoder.weights is None
    # the manifest's entry as written: the tile grid for its readers
    assert json.loads((tmp_path / "bags" / "manifest.json").read_text())["lineage"]["geometry"]["grid"] == 4


def test_old_manifests_are_read_and_converted(shards: Path, tmp_path: Path) -> None:
    """Sets of earlier versions hold only build_args (the recipe's settings): a build's, embed_tiles' and
    write_slide_bags' are read as they would be recorded now."""
    old_pixels = {key: value for key, value in load_manifest(shards).items() if key != "lineage"}
    assert read_lineage(old_pixels) == read_lineage(shards)

    model = {**TileModel().to_mapping(), "preset": "tiny", "weights": None, "trusted": False}
    old_grids = {"kind": GRIDS_KIND, "root": str(tmp_path), "build_args": {
        "data": {"shards": str(shards)}, "model": model, "embed": {"normalisation": "hipt"}, "out": str(tmp_path)}}
    grids = read_lineage(old_grids)
    assert grids.kind == TOKEN_GRIDS and grids.geometry == Geometry(128, 32, 0.5, 48)
    assert grids.source.shards == str(shards) and grids.source.manifest_sha256 is None  # not recorded then
    assert grids.tile_encoder.architecture == tile_architecture(TileModel(preset="tiny")) and grids.tile_encoder.weights is None

    features = torch.zeros(3, 8)
    write_slide_bags(tmp_path / "bags", [SlideBag("s", "p", "a", features, features[:, :2].long())], ["a"],
                     build_args={})
    assert read_lineage(tmp_path / "bags") == Lineage(SLIDE_BAGS, Geometry())  # features made elsewhere
