"""Ablation recipes as smoke tests on generated embedding bags and region shards (seconds): they keep working."""
from __future__ import annotations

import json
import re
import sys
from collections import Counter
from pathlib import Path

import pytest

from hipt_e2e.data.embeddings import write_slide_bags
from hipt_e2e.evaluation.ablation import command_line, convergence_table
from hipt_e2e.evaluation.metrics import selection_key
from hipt_e2e.training.slide_level import SlideData, training_slides
from tests.test_slide_training import CLASSES, make_bags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes" / "ablations"))
import balanced  # noqa: E402
import cnn_vs_vit  # noqa: E402
import data_scaling  # noqa: E402
import e2e_vs_frozen  # noqa: E402

FAST = ["folds=3", "optim.epochs=2", "patience=2"]


def test_convergence_table_says_where_folds_selected(tmp_path):
    def history(accuracies: list[float]) -> str:
        return json.dumps([{"epoch": e, "train_loss": 1.0, "val_loss": 1.0, "val_balanced_accuracy": a}
                           for e, a in enumerate(accuracies)])

    for run, folds in {"rising": [[0.5, 0.6, 0.7, 0.8, 0.9], [0.5, 0.6, 0.9, 0.7]],
                       "peaked": [[0.5, 0.9, 0.6, 0.6, 0.6, 0.6], [0.8, 0.5, 0.5, 0.5, 0.5]]}.items():
        for fold, accuracies in enumerate(folds):
            (tmp_path / run / f"repeat_1_fold_{fold}").mkdir(parents=True)
            (tmp_path / run / f"repeat_1_fold_{fold}" / "history.json").write_text(history(accuracies))
    rows = convergence_table({name: tmp_path / name for name in ("rising", "peaked")})
    # the last column: the selected epochs' validation score, what choices between variants are made on
    assert rows[2:] == ["| rising | 2 | 4-5 | 3 | 2 of 2 | 0.900 |", "| peaked | 2 | 5-6 | 0 | 0 of 2 | 0.850 |"]


def test_command_line_names_the_launch(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipes/ablations/balanced.py", "out=runs/a b", "cv.repeats=3"])
    script = "recipes/ablations/balanced.py 'out=runs/a b' cv.repeats=3"
    assert command_line() == script
    assert command_line(2, cpu=True) == f"ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 {script}"
    assert command_line(4) == f"accelerate launch --multi_gpu --num_processes 4 {script}"


def test_dominant_class_subsampling():
    bags = make_bags(n_per_class=12)
    data = SlideData(dominant_class="b", dominant_ratio=4.0)
    kept = Counter(bag.label for bag in training_slides(bags, data, seed=0))
    assert kept == {"b": 12, "a": 3, "c": 3}
    assert training_slides(bags, data, seed=0) == training_slides(bags, data, seed=0)


def test_data_scaling_smoke(tmp_path):
    write_slide_bags(tmp_path / "bags", make_bags(), CLASSES, build_args={})
    variants = data_scaling.main([f"data.shards={tmp_path / 'bags'}", f"out={tmp_path / 'runs'}",
                                  f"docs={tmp_path / 'docs'}", "models=[vit_wsi, fc]", "fractions=[0.5, 1.0]", *FAST])
    assert sorted(variants) == ["fc @ 100%", "fc @ 50%", "vit_wsi @ 100%", "vit_wsi @ 50%"]
    report = (tmp_path / "docs" / "data_scaling.md").read_text()
    assert "| vit_wsi @ 50% |" in report and "**Answer.**" in report and "Command:" in report
    assert set(json.loads((tmp_path / "docs" / "data_scaling.json").read_text())["variants"]) == set(variants)
    assert (tmp_path / "docs" / "data_scaling.png").stat().st_size > 0


def test_balanced_smoke(tmp_path):
    write_slide_bags(tmp_path / "bags", make_bags(), CLASSES, build_args={})
    variants = balanced.main([f"data.shards={tmp_path / 'bags'}", f"out={tmp_path / 'runs'}",
                              f"docs={tmp_path / 'docs'}", "data.dominant_class=a", "data.dominant_ratio=3", *FAST])
    assert sorted(variants) == ["balanced_sampling", "none", "weighted_loss"]
    report = (tmp_path / "docs" / "balanced.md").read_text()
    assert "recall a" in report and "subsampled to 1:3 of it" in report
    assert "| weighted_loss - none | mean recall of the minority classes |" in report
    assert "| balanced_sampling - none | mean recall of the minority classes |" in report


def test_e2e_vs_frozen_smoke(shards: Path, tmp_path: Path):
    variants = e2e_vs_frozen.main([f"data.shards={shards}", f"out={tmp_path / 'runs'}",
                                   f"docs={tmp_path / 'docs'}", "data.regions_per_slide=2", "train.epochs=2",
                                   "train.mixed_precision=no", "train.log_every=1000"])
    assert list(variants) == ["frozen", "partial", "end_to_end"]
    assert [variants[name]["mode"] for name in variants] == [
        "frozen tile encoder and ViT4K", "frozen tile encoder", "end to end"]
    report = (tmp_path / "docs" / "e2e_vs_frozen.md").read_text()
    assert all(f"| {name} |" in report for name in variants) and "without early stopping" in report
    assert "with the same budget in steps?" in report
    assert "per variant: frozen: tile, region;" in report
    assert set(json.loads((tmp_path / "docs" / "e2e_vs_frozen.json").read_text())["variants"]) == set(variants)
    assert (tmp_path / "docs" / "e2e_vs_frozen.png").stat().st_size > 0
    assert "| end_to_end | 3 | 2-2 |" in report and "![e2e_vs_frozen learning curves](e2e_vs_frozen_curves.png)" in report
    assert (tmp_path / "docs" / "e2e_vs_frozen_curves.png").stat().st_size > 0
    # the same budget: every variant trained every epoch of every fold
    assert all(len(json.loads((tmp_path / "runs" / name / f"fold_{i}" / "history.json").read_text())) == 2
               for name in variants for i in range(3))
    # budget=converged: early stopping per variant instead (patience 1 of at most 4 epochs)
    converged = e2e_vs_frozen.main([f"data.shards={shards}", f"out={tmp_path / 'converged'}", f"docs={tmp_path / 'docs2'}",
                                    "data.regions_per_slide=2", "train.epochs=4", "train.mixed_precision=no",
                                    "train.log_every=1000", "budget=converged", "patience=1"])
    converged_report = (tmp_path / "docs2" / "e2e_vs_frozen.md").read_text()
    assert "has not improved for 1 epochs (at most 4)" in converged_report
    assert "until its validation stops improving?" in converged_report and "budget in steps" not in converged_report
    for name in converged:
        for fold in range(3):  # each fold stopped at the first epoch with no better one (patience 1), or at 4
            history = json.loads((tmp_path / "converged" / name / f"fold_{fold}" / "history.json").read_text())
            keys = [selection_key(entry) for entry in history]
            stale = [e for e in range(1, len(keys)) if keys[e] <= max(keys[:e])]
            assert len(history) == (stale[0] + 1 if stale else 4), (name, fold, keys)


@pytest.mark.slow  # ~2-3 min on 2 cores: the ResNet-18 at a stride-1 stem costs ~3 s per DINO step and ~25 s to embed
def test_cnn_vs_vit_smoke(shards: Path, tmp_path: Path):
    from hipt_e2e.models.foundation import ENCODERS
    from tests.test_foundation import random_release

    kaiko, _ = random_release("kaiko-vits16", ENCODERS["kaiko-vits16"], tmp_path / "kaiko")
    tiny = REPO / "recipes" / "configs" / "tiny"
    arguments = [
        f"data.shards={shards}", f"out={tmp_path / 'runs'}", f"docs={tmp_path / 'docs'}", *FAST,
        f"pretrain.config={tiny / 'pretrain_vit256.yaml'}",
        "pretrain.overrides=[train.steps_per_epoch=2, train.batch_size=4, train.checkpoint_every=1000]",
        # stages of other precisions in one process; the region stage, as bf16 convolutions (the CNN's tiles) run
        # ~40x slower than fp32 on CPUs without native bf16 (AVX2)
        "embed_regions.overrides=[embed.mixed_precision=bf16]",
        "pretrain.minutes=0.03", "pretrain.probe_steps=4",
        f"embed_tiles.config={tiny / 'embed_tiles.yaml'}", f"embed_regions.config={tiny / 'embed_regions.yaml'}",
        "throughput.batch=4", "throughput.rounds=1",
        f"encoders={{vit: [model.encoder=vit], cnn: [model.encoder=cnn, model.cnn=resnet18, model.cnn_stem=small, "
        f"optim.name=sgd, optim.lr=0.03], kaiko: [model.encoder=kaiko-vits16, model.tile_input=native, "
        f"model.weights={kaiko}]}}"]
    variants = cnn_vs_vit.main(arguments)
    assert list(variants) == ["vit", "cnn", "kaiko"]
    assert "| kaiko | 21.67 M |" in (tmp_path / "docs" / "cnn_vs_vit.md").read_text()  # pretrained: no DINO row
    assert not (tmp_path / "runs" / "kaiko" / "dino").exists()
    cnn = json.loads((tmp_path / "runs" / "cnn" / "dino" / "model_card.json").read_text())
    assert cnn["architecture"]["stem"] == "small"
    report = (tmp_path / "docs" / "cnn_vs_vit.md").read_text()
    assert "| encoder | parameters | tiles/s | DINO steps | probed s/step | DINO minutes (this run) |" in report
    # the same wall-clock budget: each encoder's epochs from its own probed step time
    rows = {name: re.search(rf"\| {name} \| [\d.]+ M \| \d+ \| (\d+) x 2 \| ([\d.]+) \| ([\d.]+) \|", report)
            for name in ("vit", "cnn")}  # (the pretrained encoder has no DINO budget)
    assert all(rows.values()), report
    for row in rows.values():  # epochs x 2 steps x s/step fill the 1.8 s (up to one epoch and the rounding shown)
        epochs, per_step = int(row.group(1)), float(row.group(2))
        assert abs(epochs * 2 * per_step - 1.8) <= 2 * per_step + 0.2
    assert "model.cnn=resnet18" in report and "random init, frozen" in report
    assert set(json.loads((tmp_path / "docs" / "cnn_vs_vit.json").read_text())["variants"]) == set(variants)
    assert (tmp_path / "docs" / "cnn_vs_vit.png").stat().st_size > 0
    # A rerun keeps every finished stage: no DINO, embedding or cross-validation is done again.
    finished = {path: path.stat().st_mtime_ns for pattern in ("metrics.json", "backbone.safetensors", "manifest.json")
                for path in (tmp_path / "runs").rglob(pattern)}
    again = cnn_vs_vit.main(arguments)
    assert {path: path.stat().st_mtime_ns for path in finished} == finished and len(finished) == 3 + 2 + 6
    assert {name: m["summary"] for name, m in again.items()} == {name: m["summary"] for name, m in variants.items()}
