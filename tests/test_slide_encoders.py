"""Slide encoders (hipt_e2e.models.slide_encoders): each entry against its authors' code (outputs of their
implementation on random weights, stored by tests/fixtures/slide_encoders/make_<name>.py), loaded through
load_slide_encoder from the authors' key names; embed_slides on imported features, then the linear probe and
train_fc on the slide embeddings."""
from __future__ import annotations

import csv
import json
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hipt_e2e.data.embeddings import read_slide_bags
from hipt_e2e.embedding import embed_slides
from hipt_e2e.errors import InputError
from hipt_e2e.io import sha256_file
from hipt_e2e.models.checkpoint import CheckpointError
from hipt_e2e.models.longnet import SEGMENT_LENGTHS
from hipt_e2e.models.slide_encoders import SLIDE_ENCODERS, SlideEncoderEntry, load_slide_encoder
from hipt_e2e.training.linear_probe import C_GRID
from shards.features import FeatureBuildSettings, build_features
from tests.test_dino_recipes import REPO
from tests.test_features import WIDTH, coded_features, slide_cells, write_trident

sys.path.insert(0, str(REPO / "recipes"))
import embed_slides as embed_slides_recipe  # noqa: E402
import linear_probe as linear_probe_recipe  # noqa: E402
import train_fc  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "slide_encoders"
# both sides compute each output in float32 as sums over the 37 tiles and the input width, in another order:
# 64 ulps of the output's scale bounds that reordering (measured: 0, the same order here)
TOLERANCE = 64 * torch.finfo(torch.float32).eps
SMALL = {"feather": {"in_dim": 32, "hidden": 16, "attention": 8},  # as make_<name>.py built the authors' model
         "chief": {"in_dim": 384, "hidden": 256, "attention": 256}}


def authors_fixture(name: str, tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """The authors' random state dict as a weights file under their key names, the input, their output."""
    with safe_open(FIXTURES / f"{name}.safetensors", "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    weights = tmp_path / f"{name}.safetensors"
    save_file({k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}, weights)
    return weights, tensors["input"], tensors["output"]


@pytest.mark.parametrize("name", ["feather", "chief"])
def test_each_slide_encoder_gives_its_authors_embedding(name, tmp_path):
    weights, features, expected = authors_fixture(name, tmp_path)
    model, record = load_slide_encoder(name, weights, **SMALL[name])
    with torch.no_grad():
        embedding = model(features, None, None)
    scale = expected.abs().max().item()
    assert embedding.shape == expected.shape and scale > 0.1
    assert (embedding - expected).abs().max().item() <= TOLERANCE * scale
    assert record["path"] == str(weights.resolve()) and len(record["sha256"]) == 64


def test_feather_uni2_is_feather_over_uni2_h_features():
    uni2, conch = SLIDE_ENCODERS["feather_uni_v2"], SLIDE_ENCODERS["feather"]
    assert (uni2.tile_encoder, uni2.in_dim, uni2.width) == ("uni_v2", 1536, 512)
    assert (conch.tile_encoder, conch.in_dim, conch.width) == ("conch_v15", 768, 512)
    chief = SLIDE_ENCODERS["chief"]
    assert (chief.tile_encoder, chief.in_dim, chief.width) == ("ctranspath", 768, 768)
    for entry in (uni2, conch, chief):
        assert entry.build()(torch.randn(3, entry.in_dim)).shape == (entry.width,)


def test_a_file_missing_a_used_tensor_or_holding_a_foreign_one_is_refused(tmp_path):
    weights, _, _ = authors_fixture("chief", tmp_path)
    with safe_open(weights, "pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
    save_file({k: v for k, v in state.items() if k != "attention_net.3.attention_c.weight"}, tmp_path / "missing.safetensors")
    with pytest.raises(CheckpointError, match=r"missing.safetensors does not fit slide encoder chief.*attention_c"):
        load_slide_encoder("chief", tmp_path / "missing.safetensors", **SMALL["chief"])
    save_file({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.safetensors")
    with pytest.raises(CheckpointError, match=r"extra.safetensors does not fit slide encoder chief.*extra"):
        load_slide_encoder("chief", tmp_path / "extra.safetensors", **SMALL["chief"])


def random_authors_file(entry: SlideEncoderEntry, path: Path, **build_kwargs) -> nn.Module:
    """A random module of the entry saved under the authors' key names (the renames backwards)."""
    module = entry.build(**build_kwargs)
    theirs = {}
    for key, value in module.state_dict().items():
        match = next(((a, o) for a, o in entry.renames if key.startswith(o)), ("", ""))
        theirs[match[0] + key.removeprefix(match[1])] = value.contiguous()
    save_file(theirs, path)
    return module.eval()


def test_embed_slides_then_the_linear_probe_and_train_fc(tmp_path, monkeypatch):
    rng, rows, tiles = np.random.default_rng(7), [], {}
    for n in range(9):
        cells = slide_cells(rng)
        tiles[f"s{n}"] = coded_features(cells, rng) + 2 * (n % 3)  # the class shifts every feature
        write_trident(tmp_path / "in" / f"s{n}.h5", tiles[f"s{n}"], cells * 16, encoder="uni_v2")
        rows.append(f"s{n},{'abc'[n % 3]},p{n}")
    (tmp_path / "labels.csv").write_text("slide_id,label,patient_id\n" + "\n".join(rows) + "\n")
    build_features(FeatureBuildSettings.from_mapping({"input": str(tmp_path / "in"), "out": str(tmp_path / "grids"),
                                                      "grid": 4, "labels": str(tmp_path / "labels.csv"),
                                                      "dtype": "float32"}))
    feather = SLIDE_ENCODERS["feather_uni_v2"]  # over UNI2-h features: here 12-d ones, embedded in 6-d
    tiny = {"in_dim": WIDTH, "hidden": 6, "attention": 4}
    monkeypatch.setitem(SLIDE_ENCODERS, "feather_tiny",
                        replace(feather, name="feather_tiny", in_dim=WIDTH, width=6, build=partial(feather.build, **tiny)))
    module = random_authors_file(feather, tmp_path / "feather.safetensors", **tiny)
    manifest = embed_slides_recipe.main([f"data.shards={tmp_path / 'grids'}", f"out={tmp_path / 'slides'}",
                                         "model.slide_encoder=feather_tiny",
                                         f"model.weights={tmp_path / 'feather.safetensors'}"])
    slide = manifest["lineage"]["slide_encoder"]
    assert slide["architecture"]["slide_encoder"] == "feather_tiny"
    assert slide["sha256"] == sha256_file(tmp_path / "feather.safetensors")
    bags, classes = read_slide_bags(tmp_path / "slides")
    assert classes == ["a", "b", "c"] and len(bags) == 9
    for bag in bags:  # attention pooling ignores order: the slide's own tiles, no background place, no other
        with torch.no_grad():
            expected = module(torch.from_numpy(tiles[bag.slide_id]))
        assert bag.features.shape == (1, 6) and torch.allclose(bag.features[0], expected, atol=1e-5)
    metrics = linear_probe_recipe.main([f"data.shards={tmp_path / 'slides'}", f"out={tmp_path / 'probe'}", "folds=3"])
    for fold in range(3):
        assert json.loads((tmp_path / "probe" / f"fold_{fold}" / "probe.json").read_text())["C"] in C_GRID
    fc = train_fc.main([f"data.shards={tmp_path / 'slides'}", f"out={tmp_path / 'fc'}", "folds=3", "optim.epochs=2"])
    for out, result in ((tmp_path / "probe", metrics), (tmp_path / "fc", fc)):
        assert len(list(csv.DictReader(open(out / "predictions.csv")))) == 9, result
    assert metrics["summary"]["balanced_accuracy"]["mean"] > 0.5, metrics["summary"]


def test_grids_of_another_tile_encoder_are_refused_naming_both(tmp_path):
    rng = np.random.default_rng(8)
    cells = slide_cells(rng)
    write_trident(tmp_path / "in" / "s0.h5", coded_features(cells, rng), cells * 16, encoder="uni_v2")
    build_features(FeatureBuildSettings.from_mapping({"input": str(tmp_path / "in"), "out": str(tmp_path / "grids"),
                                                      "grid": 4}))
    chief = SLIDE_ENCODERS["chief"]
    with pytest.raises(InputError, match=r"grids: holds token_grids of tile encoder uni_v2 \(12-d features\); slide "
                                         r"encoder chief reads token grids of ctranspath \(768-d\)"):
        embed_slides(chief.build(), chief, {"path": "x", "sha256": "0"}, tmp_path / "grids", tmp_path / "out",
                     settings={})
    assert not (tmp_path / "out").exists()


def test_gigapath_slide_encoder_gives_the_authors_embedding(tmp_path):
    """LongNet against prov-gigapath's code on 200 tiles at width 64, with segments of 1024, 362, 128, 45 and 16
    tokens so that the three shortest span several segments (measured: 1.4 ulps of the output's scale after 11
    layers), loaded from a .pth laid out as their slide_encoder.pth ({"model": state dict})."""
    with safe_open(FIXTURES / "gigapath.safetensors", "pt") as f:
        fixture = {key: f.get_tensor(key) for key in f.keys()}
    assert tuple(fixture["released_segment_lengths"].tolist()) == SEGMENT_LENGTHS
    weights = tmp_path / "slide_encoder.pth"
    torch.save({"model": {k.removeprefix("state."): v for k, v in fixture.items() if k.startswith("state.")}}, weights)
    model, _ = load_slide_encoder("gigapath-slide", weights, in_dim=128, dim=64, mlp_dim=256,
                                  segment_lengths=tuple(fixture["segment_lengths"].tolist()))
    features, coords, tile_size = fixture["input"], fixture["coords"], fixture["tile_size"].item()
    with torch.no_grad():
        embedding = model(features, coords, tile_size)
    expected = fixture["output"]
    scale = expected.abs().max().item()
    assert embedding.shape == expected.shape and scale > 0.1
    assert (embedding - expected).abs().max().item() <= TOLERANCE * scale
    with pytest.raises(InputError, match=r"tile coordinates: tiles of 512 px must lie within the first 1000 x 1000"):
        model(features[:2], torch.tensor([[0, 0], [1000 * tile_size, 0]]), tile_size)
    entry = SLIDE_ENCODERS["gigapath-slide"]
    assert (entry.tile_encoder, entry.in_dim, entry.width, entry.needs_coords) == ("gigapath", 1536, 768, True)


def test_madeleine_gives_the_authors_embedding(tmp_path):
    """MADELEINE's encode_he (4 heads at widths 32 -> 16, attention 8: make_madeleine.py) from a .pt state dict
    under the authors' keys, the training-only token_projector among them."""
    weights, features, expected = authors_fixture("madeleine", tmp_path)
    with safe_open(weights, "pt") as f:
        torch.save({key: f.get_tensor(key) for key in f.keys()}, tmp_path / "model.pt")
    model, _ = load_slide_encoder("madeleine", tmp_path / "model.pt", in_dim=32, hidden=16, attention=8, heads=4)
    with torch.no_grad():
        embedding = model(features, None, None)
    scale = expected.abs().max().item()
    assert embedding.shape == expected.shape and scale > 0.1
    assert (embedding - expected).abs().max().item() <= TOLERANCE * scale
    entry = SLIDE_ENCODERS["madeleine"]
    assert (entry.tile_encoder, entry.in_dim, entry.width, entry.needs_coords) == ("conch_v1", 512, 512, False)
    assert entry.build()(torch.randn(3, 512)).shape == (512,)
