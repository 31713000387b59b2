"""Rescoring a finished run's test folds with its fold models (hipt_e2e.training.rescore): without TTA
it gives the run's own predictions back, with TTA what the end-to-end engine's TTA evaluation gives, on
the run's splits (so the paired comparison pairs them), with its cost, and nothing trained."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hipt_e2e.data.augment import tta_poses
from hipt_e2e.data.manifest import load_manifest
from hipt_e2e.data.regions import ShardRegions
from hipt_e2e.evaluation.compare import compare_runs, load_run
from hipt_e2e.models.bundle import load_bundle
from hipt_e2e.training.e2e import slide_probabilities
from hipt_e2e.training.rescore import RescoreSettings, main, rescore
from tests.test_e2e import load_recipe, settings


def by_slide(run) -> np.ndarray:
    return run.probs[np.argsort(run.slide_id)]


GEOMETRY = ["model.tile.embed_dim=24", "model.tile.depth=1", "model.region.in_dim=24", "model.region.embed_dim=12",
            "model.region.depth=1"]


def test_rescoring_pairs_with_the_run_and_tta_matches_the_engines(shards: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    load_recipe().main(settings(shards, run, *GEOMETRY, "train.epochs=1"))
    plain = rescore(run, tmp_path / "plain", RescoreSettings(tta="none"))
    turned = rescore(run, tmp_path / "tta", RescoreSettings(tta="dihedral"))

    original, again, tta = (load_run(path, name) for path, name in
                            ((run, "run"), (tmp_path / "plain", "plain"), (tmp_path / "tta", "tta")))
    lines, pairs = compare_runs([original, again, tta])  # refuses runs on different splits
    assert len(pairs) == 3 and all(len(pair.differences) == 3 for pair in pairs)
    # fp32 both ways, the prediction path's attention against the engine's: rounding only (predictions.csv
    # holds 6 decimals)
    np.testing.assert_allclose(by_slide(again), by_slide(original), rtol=0, atol=1e-5)

    # TTA through the prediction path = the engine's own TTA evaluation (e2e tta=dihedral) of the fold model,
    # up to the 6 decimals of predictions.csv and fp32 rounding (this trained tiny model moves by 1e-5 between
    # poses on these slides; test_predict checks the two paths' TTA on a model that moves by more)
    regions = ShardRegions(shards, regions_per_slide=None, seed=0)
    fold_0 = {slide for slide, fold in zip(tta.slide_id, tta.fold) if fold == 0}
    model = load_bundle(run / "fold_0").model.eval()
    engine = slide_probabilities(model, (regions[key] for slide in sorted(fold_0) for key in regions.chunks(slide, 16)),
                                 torch.device("cpu"), 0.0, contextlib.nullcontext, tta_poses("dihedral"))
    for slide, probs in zip(tta.slide_id, tta.probs):
        if slide in fold_0:
            np.testing.assert_allclose(probs, engine[slide], rtol=0, atol=2e-6)

    # its cost: every test region's 16 tiles counted once, 8 poses each; nothing trained or checkpointed
    manifest = load_manifest(shards)
    tiles = sum(manifest["slides"][slide]["regions"] for slide in tta.slide_id) * 16
    assert turned["rescore"]["total"]["tiles"] == plain["rescore"]["total"]["tiles"] == tiles
    cost = json.loads((tmp_path / "tta" / "rescore.json").read_text())
    assert {fold["poses"] for fold in cost["folds"].values()} == {8} and cost["tta"] == "dihedral"
    assert cost["total"]["tiles_per_s"] > 0 and not list((tmp_path / "tta").rglob("checkpoint.pt"))
    assert (tmp_path / "tta" / "splits.csv").read_text() == (run / "splits.csv").read_text()


def test_rescoring_names_what_is_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'splits.csv'} not found"):
        main([str(tmp_path), "--out", str(tmp_path / "out")])


def test_a_bad_rescore_setting_fails_at_the_start_naming_its_key(tmp_path: Path) -> None:
    from hipt_e2e.errors import SettingError

    with pytest.raises(SettingError, match="^chunk_regions: must be >= 1"):
        main([str(tmp_path), "--out", str(tmp_path / "out"), "--chunk-regions", "0"])
    assert not (tmp_path / "out").exists()
