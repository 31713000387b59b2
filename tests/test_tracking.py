"""train.log_with: the runs' scalars and settings in TensorBoard event files (offline, in the run folder),
for end-to-end, slide-level and DINO training; a clear error when a tracker's package is missing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from hipt_e2e.training.tracking import tracker_settings  # noqa: E402


def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_end_to_end_run_writes_loss_and_validation_scalars(shards: Path, tmp_path: Path) -> None:
    import json

    from tests.test_e2e import load_recipe, settings

    out = tmp_path / "run"
    load_recipe().main(settings(shards, out, "train.log_with=tensorboard"))
    found = scalars(out / "e2e")
    for fold in ("fold_0", "fold_2"):
        log = [json.loads(line) for line in (out / fold / "train_log.jsonl").read_text().splitlines()]
        assert [value for _, value in found[f"{fold}/train/loss"]] == pytest.approx([e["loss"] for e in log])
        assert [step for step, _ in found[f"{fold}/train/loss"]] == [e["step"] for e in log]
        history = json.loads((out / fold / "history.json").read_text())
        assert [v for _, v in found[f"{fold}/epoch/val_balanced_accuracy"]] == pytest.approx(
            [h["val_balanced_accuracy"] for h in history])
        assert all(value > 0 for _, value in found[f"{fold}/train/tiles_per_s"])
        assert {f"{fold}/train/lr_tile", f"{fold}/train/lr_slide", f"{fold}/epoch/train_loss"} <= found.keys()


def test_slide_level_and_dino_runs_write_their_scalars(tmp_path: Path, synthetic_slides: Path) -> None:
    from hipt_e2e.data.embeddings import write_slide_bags
    from shards.build import BuildSettings, build
    from tests.test_dino_recipes import run_recipe
    from tests.test_slide_training import CLASSES, make_bags, train_wsi

    write_slide_bags(tmp_path / "bags", make_bags(n_per_class=6, split=True), CLASSES, build_args={})
    train_wsi.main([f"data.shards={tmp_path / 'bags'}", "optim.epochs=2", f"out={tmp_path / 'slide'}",
                    "train.log_with=tensorboard"])
    assert {"fold_0/epoch/train_loss", "fold_0/epoch/val_balanced_accuracy"} <= scalars(tmp_path / "slide" / "slide").keys()

    build(BuildSettings.from_mapping({"kind": "images", "input": str(synthetic_slides), "labels": str(synthetic_slides / "labels.csv"),
                                      "out": str(tmp_path / "tiles"), "slide_mpp": 0.5, "tile_px": 32, "region_px": 64, "encoding": "png"}))
    run_recipe("pretrain_vit256", f"data.shards={tmp_path / 'tiles'}", f"out={tmp_path / 'dino'}",
               "train.steps_per_epoch=2", "train.log_with=tensorboard")
    found = scalars(tmp_path / "dino" / "dino")
    assert [step for step, _ in found["train/loss"]] == [0, 1, 2, 3]
    assert {"train/lr", "train/teacher_temp", "train/samples_per_s"} <= found.keys()


def test_a_missing_tracker_names_its_extra(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train.log_with must be none or one of"):
        tracker_settings("tensorbored", tmp_path)
    if importlib.util.find_spec("mlflow") is None:
        with pytest.raises(ImportError, match=r"pip install 'hipt-e2e\[mlflow\]'"):
            tracker_settings("mlflow", tmp_path)
    assert tracker_settings("none", tmp_path) == {}
