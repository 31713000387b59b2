"""Patients as bags (level=patient): slide-level training, end-to-end training and hipt-predict bag all
regions of a patient's slides, label, split and predict per patient, and refuse a patient whose slides
disagree."""
from __future__ import annotations

import csv
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hipt_e2e.data.embeddings import SlideBag, unit_bags, write_slide_bags
from hipt_e2e.data.regions import ShardRegions
from hipt_e2e.errors import InputError, SettingError
from hipt_e2e.inference.predict import Predictor, main
from hipt_e2e.models import HIPT
from hipt_e2e.training.checkpointing import export_safetensors
from hipt_e2e.training.rescore import RescoreSettings, rescore

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))
import train_wsi  # noqa: E402

CLASSES = ["neg", "pos"]


def cohort(patients_per_class: int = 6, dim: int = 8, seed: int = 0, marker: float = 5.0) -> list[SlideBag]:
    """Two slides per patient, 3-6 noise regions each. A positive patient's tumour is on one of its slides
    (a or b, alternating): 1-2 of its regions carry a marker. Its other slide, labelled positive as well,
    looks like a negative patient's: a slide alone misleads, the patient's bag of both holds the evidence."""
    rng = np.random.default_rng(seed)
    bags = []
    for label in CLASSES:
        for n in range(patients_per_class):
            patient = f"{label}{n:02d}"
            for part in "ab":
                features = rng.normal(size=(int(rng.integers(3, 7)), dim))
                if label == "pos" and part == "ab"[n % 2]:
                    features[rng.choice(len(features), int(rng.integers(1, 3)), replace=False), 0] += marker
                coords = np.stack([np.arange(len(features)) * 256, np.zeros(len(features))], 1)
                bags.append(SlideBag(f"{patient}_{part}", patient, label, torch.tensor(features, dtype=torch.float32),
                                     torch.tensor(coords, dtype=torch.int64)))
    return bags


def test_a_patient_bag_holds_its_slides_regions_in_slide_order():
    bags = cohort()
    patients = unit_bags(bags, "patient", "cohort")
    assert len(patients) == 12 and unit_bags(bags, "slide", "cohort") == bags
    first = next(p for p in patients if p.patient_id == "pos03")
    a, b = (next(bag for bag in bags if bag.slide_id == f"pos03_{part}") for part in "ab")
    assert first.slide_id == "pos03_a;pos03_b" and first.label == "pos"
    assert len(first.features) == len(a.features) + len(b.features)  # the bag size: its slides' regions
    assert torch.equal(first.features, torch.cat([a.features, b.features]))
    assert torch.equal(first.coords, torch.cat([a.coords, b.coords]))


def test_patient_level_training_classifies_each_patient_from_both_slides(tmp_path):
    bags = cohort(patients_per_class=8, marker=8.0)
    write_slide_bags(tmp_path / "bags", bags, CLASSES, build_args={})
    runs = {level: train_wsi.main([f"data.shards={tmp_path / 'bags'}", f"out={tmp_path / level}", f"level={level}",
                                   "model.name=abmil", "folds=5", "optim.epochs=15", "patience=15", "optim.lr=5e-3"])
            for level in ("slide", "patient")}
    patient, slide = (runs[level]["summary"] for level in ("patient", "slide"))
    # a slide alone: half the positive slides are drawn as negatives are, so its AUC is 0.75 at best (measured
    # 0.725 here and at the dependency floors); a patient's bag holds the marker: 1.0 measured in both
    assert patient["auc_macro"]["mean"] >= 0.9 and patient["balanced_accuracy"]["mean"] >= 0.85, patient
    assert slide["auc_macro"]["mean"] <= patient["auc_macro"]["mean"] - 0.15, slide
    rows = list(csv.DictReader(open(tmp_path / "patient" / "predictions.csv")))
    assert sorted((r["patient_id"], r["slide_id"]) for r in rows) == sorted(
        {(bag.patient_id, f"{bag.patient_id}_a;{bag.patient_id}_b") for bag in bags})  # one row per patient
    splits = list(csv.DictReader(open(tmp_path / "patient" / "splits.csv")))
    tested = Counter(r["patient_id"] for r in splits if r["part"] == "test")
    assert len(tested) == 16 and set(tested.values()) == {1}  # each patient tested once, as one unit
    assert runs["patient"]["level"] == "patient" and "level" not in runs["slide"]
    assert "16 patients, 5 fold(s)" in (tmp_path / "patient" / "report.md").read_text()
    assert "32 slides, 5 fold(s)" in (tmp_path / "slide" / "report.md").read_text()


def test_a_patient_whose_slides_disagree_is_refused_naming_it(tmp_path):
    bags = cohort(patients_per_class=3)
    bags[1].label = "pos"  # neg00_b
    write_slide_bags(tmp_path / "bags", bags, CLASSES, build_args={})
    with pytest.raises(InputError, match=r"patient neg00's slides differ in label or split \(neg00_a: neg, neg00_b: pos\)"):
        train_wsi.main([f"data.shards={tmp_path / 'bags'}", f"out={tmp_path / 'run'}", "level=patient", "folds=3"])
    assert not (tmp_path / "run").exists()


def test_end_to_end_training_bags_and_predicts_patients(shards, tmp_path):
    """The synthetic cohort: 6 patients of 2 slides, 4 regions each. regions_per_slide draws per patient bag."""
    regions = ShardRegions(shards, regions_per_slide=3, seed=0, level="patient")
    unit = regions.infos()[0]
    assert len(regions.infos()) == 6 and unit.slide_id.count(";") == 1 and len(regions.slides[unit.slide_id]) == 8
    drawn = regions[regions.sample(unit.slide_id, 0)]
    assert drawn["slide_id"] == unit.slide_id and len(drawn["pixels"]) == 3
    whole = regions[regions.chunks(unit.slide_id, 100)[0]]
    slides = ShardRegions(shards, regions_per_slide=None, seed=0)
    parts = [slides[slides.chunks(s, 100)[0]] for s in unit.slide_id.split(";")]
    assert torch.equal(whole["pixels"], torch.cat([p["pixels"] for p in parts]))  # slide after slide

    from tests.test_e2e import load_recipe, settings

    geometry = ["model.tile.embed_dim=24", "model.tile.depth=1", "model.region.in_dim=24", "model.region.embed_dim=12",
                "model.region.depth=1"]
    # 3 regions per evaluation call: a patient's chunks cross from one slide into the next
    metrics = load_recipe().main(settings(shards, tmp_path / "run", *geometry, "train.epochs=1", "level=patient",
                                          "memory.eval_regions=3"))
    rows = list(csv.DictReader(open(tmp_path / "run" / "predictions.csv")))
    assert metrics["level"] == "patient" and len(rows) == 6
    assert sorted(r["slide_id"] for r in rows) == sorted(u.slide_id for u in regions.infos())
    # rescoring reads the patient-level splits back and scores each patient's bag by the prediction path
    rescore(tmp_path / "run", tmp_path / "rescored", RescoreSettings(tta="none"))
    again = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "rescored" / "predictions.csv"))}
    for row in rows:
        assert float(again[row["slide_id"]]["prob_class_a"]) == pytest.approx(float(row["prob_class_a"]), abs=1e-5)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "hipt.safetensors"
    export_safetensors(HIPT.from_preset("tiny", n_classes=2), path)
    return path


def test_predict_scores_a_patient_as_one_bag_of_its_slides(shards, e2e_slides, tiny_model, tmp_path):
    model = ["model.preset=tiny", "model.classes=[class_a, class_b]", f"model.weights={tiny_model}", "top_regions=1"]
    assert main([str(shards), "input_kind=shards", "level=patient", f"out={tmp_path / 'shards'}", *model]) == 0
    rows = {r["patient_id"]: r for r in csv.DictReader(open(tmp_path / "shards" / "predictions.csv"))}
    row = rows["class_a_p000"]
    assert len(rows) == 6 and row["slide_id"] == "class_a_000;class_a_001" and row["n_regions"] == "8"
    for slide in ("class_a_000", "class_a_001"):  # the heatmaps stay per slide
        assert (tmp_path / "shards" / "heatmaps" / f"{slide}_regions.png").exists()

    hipt = HIPT.from_preset("tiny", n_classes=2)
    hipt.load_state_dict(load_file(tiny_model))
    regions = ShardRegions(shards, regions_per_slide=None, seed=0)
    slides = [regions[regions.chunks(s, 100)[0]]["pixels"].permute(0, 2, 3, 1).numpy() for s in ("class_a_000", "class_a_001")]
    predictor = Predictor([(hipt, None)], ["class_a", "class_b"])
    bag = predictor.predict_bag([(((0, 0, rgb) for rgb in slide), 128) for slide in slides])
    alone = predictor.predict(((0, 0, rgb) for rgb in slides[0]), 128)
    assert float(row["prob_class_a"]) == pytest.approx(bag[0].probs[0], abs=1e-5)
    # one bag: the slide model's attention is a softmax over the patient's 8 regions, split into its slides' 4 + 4
    assert [len(part.scores) for part in bag] == [4, 4] and bag[0].probs.tolist() == bag[1].probs.tolist()
    assert sum(part.scores.sum() for part in bag) == pytest.approx(1.0) and alone.scores.sum() == pytest.approx(1.0)
    assert bag[0].scores.sum() == pytest.approx(0.5, abs=0.01)

    # the same patients from the image files, named by the labels CSV's patient_id column
    assert main([str(e2e_slides), "input_kind=images", "level=patient", f"patients={e2e_slides / 'labels.csv'}",
                    "geometry.slide_mpp=0.5", "geometry.min_tissue=0", f"out={tmp_path / 'images'}", *model]) == 0
    images = {r["patient_id"]: r for r in csv.DictReader(open(tmp_path / "images" / "predictions.csv"))}
    assert images.keys() == rows.keys()
    for patient, row in rows.items():
        assert images[patient]["slide_id"] == row["slide_id"]
        assert float(images[patient]["prob_class_a"]) == pytest.approx(float(row["prob_class_a"]), abs=1e-4)
    with pytest.raises(SettingError, match="needs patients=CSV"):
        main([str(e2e_slides), "input_kind=images", "level=patient", f"out={tmp_path / 'none'}", *model])
