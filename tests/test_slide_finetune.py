"""Fine-tuning a pretrained slide encoder under slide-level cross-validation (model.slide_encoder in train_wsi):
the tiles of imported TRIDENT features through a random small FEATHER with a linear head, layer-wise lr decay,
the paired comparison with attention-MIL over the same tiles on the same folds, and the refusal of grids of
another tile encoder."""
from __future__ import annotations

import csv
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from hipt_e2e.embedding import slide_encoder_bags
from hipt_e2e.errors import InputError, SettingError
from hipt_e2e.evaluation import compare
from hipt_e2e.models.mil import SlideModel
from hipt_e2e.models.slide_encoders import SLIDE_ENCODERS
from hipt_e2e.training.slide_level import SlideOptim, build_slide_model, param_groups
from shards.features import FeatureBuildSettings, build_features
from tests.test_dino_recipes import run_recipe
from tests.test_features import WIDTH, coded_features, slide_cells, train_wsi, write_trident
from tests.test_slide_encoders import random_authors_file

TINY_FEATHER = {"in_dim": WIDTH, "hidden": 6, "attention": 4}
TINY_GIGAPATH = {"in_dim": WIDTH, "dim": 16, "layers": 2, "heads": 2, "mlp_dim": 32, "segment_lengths": (8, 16),
                 "ratios": (1, 2)}


def tiny_entry(monkeypatch, name: str, kwargs: dict, width: int, path: Path) -> Path:
    """A small random copy of a registry entry over 12-d uni_v2 features, registered as NAME_tiny, saved under
    the authors' key names at `path`."""
    entry = SLIDE_ENCODERS[name]
    monkeypatch.setitem(SLIDE_ENCODERS, f"{name}_tiny", replace(entry, name=f"{name}_tiny", tile_encoder="uni_v2",
                                                                in_dim=WIDTH, width=width, build=partial(entry.build, **kwargs)))
    random_authors_file(entry, path, **kwargs)
    return path


@pytest.fixture
def grids(tmp_path: Path) -> Path:
    """Nine slides of imported TRIDENT uni_v2 features, three classes that shift every feature."""
    rng, rows = np.random.default_rng(11), []
    for n in range(9):
        cells = slide_cells(rng)
        write_trident(tmp_path / "in" / f"s{n}.h5", coded_features(cells, rng) + 2 * (n % 3), cells * 16, encoder="uni_v2")
        rows.append(f"s{n},{'abc'[n % 3]},p{n}")
    (tmp_path / "labels.csv").write_text("slide_id,label,patient_id\n" + "\n".join(rows) + "\n")
    build_features(FeatureBuildSettings.from_mapping({"input": str(tmp_path / "in"), "out": str(tmp_path / "grids"),
                                                      "grid": 4, "labels": str(tmp_path / "labels.csv"),
                                                      "dtype": "float32"}))
    return tmp_path / "grids"


def test_fine_tuning_feather_pairs_with_attention_mil_on_the_same_folds(grids, tmp_path, monkeypatch, capsys):
    weights = tiny_entry(monkeypatch, "feather_uni_v2", TINY_FEATHER, 6, tmp_path / "feather.safetensors")
    train_wsi.main([f"data.shards={grids}", f"out={tmp_path / 'feather'}", "folds=3", "optim.epochs=6",
                    "optim.lr=0.01", "patience=10", "model.slide_encoder=feather_uni_v2_tiny",
                    f"model.weights={weights}"])
    for fold in range(3):
        losses = [entry["train_loss"] for entry in json.loads((tmp_path / "feather" / f"fold_{fold}" /
                                                               "history.json").read_text())]
        assert len(losses) == 6 and losses[-1] < losses[0], losses
        card = json.loads((tmp_path / "feather" / f"fold_{fold}" / "model_card.json").read_text())
        assert card["architecture"]["slide"]["slide_encoder"] == "feather_uni_v2_tiny"
        assert card["slide_encoder_base"]["path"] == str(weights.resolve())
    assert len(list(csv.DictReader(open(tmp_path / "feather" / "predictions.csv")))) == 9
    run_recipe("embed_regions", f"data.shards={grids}", f"out={tmp_path / 'tiles'}", "embed.level=tile")
    train_wsi.main([f"data.shards={tmp_path / 'tiles'}", f"out={tmp_path / 'abmil'}", "folds=3", "optim.epochs=2",
                    "model.name=abmil"])
    capsys.readouterr()
    compare.main([str(tmp_path / "feather"), str(tmp_path / "abmil"), "--bootstrap", "50"])
    assert "feather - abmil" in capsys.readouterr().out


def test_learning_rates_decay_from_the_head_down_the_layers(grids, tmp_path, monkeypatch):
    optim = SlideOptim(lr=1e-3, layer_decay=0.5)
    feather = tiny_entry(monkeypatch, "feather_uni_v2", TINY_FEATHER, 6, tmp_path / "feather.safetensors")
    model = build_slide_model(SlideModel(slide_encoder="feather_uni_v2_tiny", weights=str(feather)), 3, WIDTH)
    groups = param_groups(model, optim)  # one stage: the encoder at lr * decay, the head at lr
    assert [group["lr"] for group in groups] == [1e-3, 5e-4]
    assert groups[0]["params"] == list(model.head.parameters())
    assert groups[1]["params"] == list(model.encoder.parameters())
    gigapath = tiny_entry(monkeypatch, "gigapath-slide", TINY_GIGAPATH, 16, tmp_path / "gigapath.safetensors")
    model = build_slide_model(SlideModel(slide_encoder="gigapath-slide_tiny", weights=str(gigapath)), 3, WIDTH)
    lrs = {id(p): group["lr"] for group in param_groups(model, optim) for p in group["params"]}
    expected = {"head.": 1e-3, "encoder.norm.": 1e-3, "encoder.encoder.layers.1.": 5e-4,
                "encoder.encoder.layers.0.": 2.5e-4, "encoder.patch_embed.": 1.25e-4, "encoder.cls_token": 1.25e-4}
    for name, parameter in model.named_parameters():
        assert lrs[id(parameter)] == next(lr for prefix, lr in expected.items() if name.startswith(prefix)), name
    # a coordinate-reading encoder gets each tile's level-0 x, y and the tile side as the bag's last columns
    bags, _ = slide_encoder_bags(grids, SLIDE_ENCODERS["gigapath-slide_tiny"], 1e-3)
    bag = bags[0]
    assert torch.equal(bag.features[:, -3:-1], bag.coords.float()) and set(bag.features[:, -1].tolist()) == {16.0}
    model.eval()
    with torch.no_grad():
        expected_logits = model.head(model.encoder(bag.features[:, :WIDTH], bag.coords, 16)[None])
        assert torch.equal(model(bag.features), expected_logits)


def test_grids_of_another_tile_encoder_are_refused_naming_both(grids, tmp_path):
    with pytest.raises(InputError, match=r"holds token_grids of tile encoder uni_v2 \(12-d features\); slide "
                                         r"encoder chief reads token grids of ctranspath \(768-d\)"):
        train_wsi.main([f"data.shards={grids}", f"out={tmp_path / 'chief'}", "folds=3", "model.slide_encoder=chief",
                        f"model.weights={tmp_path / 'none.safetensors'}"])
    assert not (tmp_path / "chief" / "predictions.csv").exists()
    # a coordinate-reading encoder cannot take a patient's slides as one bag: their coordinates overlap
    with pytest.raises(SettingError, match=r"gigapath-slide reads tile coordinates.*use level=slide"):
        train_wsi.main([f"data.shards={grids}", f"out={tmp_path / 'giga'}", "level=patient",
                        "model.slide_encoder=gigapath-slide", f"model.weights={tmp_path / 'none.pth'}"])
