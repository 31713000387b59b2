"""The linear probe on slide embeddings (recipes/embed_slides.py, or any slide bags: a bag's mean row):
standardised logistic regression whose regularisation C is chosen on each fold's validation part (balanced
accuracy, then log-loss), trained on the fold's training part as the other models are, scored on its test
part, through the fold loop every slide-level model shares (the same folds, outputs and report).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import ClassifierMixin

from hipt_e2e.config import section
from hipt_e2e.data.embeddings import SlideBag, read_slide_bags, unit_bags
from hipt_e2e.evaluation.knn import linear_probe
from hipt_e2e.evaluation.splits import Fold
from hipt_e2e.io import atomic_write_json
from hipt_e2e.runtime import make_accelerator
from hipt_e2e.training.folds import FoldSettings, run_folds
from hipt_e2e.training.recipe import recipe_settings
from hipt_e2e.training.slide_level import ModelSelection, SlideData, training_slides

C_GRID = tuple(10.0 ** k for k in range(-4, 3))  # 1e-4 ... 1e2, the inverse regularisation strengths tried


@dataclass(frozen=True)
class ProbeSettings(FoldSettings):
    """recipes/linear_probe.py's settings: the cross-validation (imbalance: none, or class-balanced weights for
    either of the others) and the bags."""
    data: SlideData = section(SlideData)


def _embeddings(bags: list[SlideBag]) -> np.ndarray:
    """One row per bag: its slide embedding (at level=patient the mean of the patient's slides')."""
    return np.stack([bag.features.mean(dim=0).numpy() for bag in bags])


def _probs(probe: ClassifierMixin, bags: list[SlideBag], n_classes: int) -> np.ndarray:
    """[len(bags), K] probabilities, zero for classes the fold's training part lacks."""
    probs = np.zeros((len(bags), n_classes))
    probs[:, probe.classes_] = probe.predict_proba(_embeddings(bags))
    return probs


def probe_fold(fold: Fold, by_id: dict[str, SlideBag], classes: list[str], settings: ProbeSettings,
               fold_dir: Path) -> np.ndarray:
    """Fit one probe per C on the fold's training part, keep the best on its validation part (C = 1 without
    one), write fold_dir/probe.json (each C's validation metrics, the chosen C); the test probabilities."""
    train = training_slides([by_id[s] for s in fold.train], settings.data, settings.seed + fold.seed_offset)
    val, test = [by_id[s] for s in fold.val], [by_id[s] for s in fold.test]
    x, y = _embeddings(train), np.array([classes.index(bag.label) for bag in train])
    val_y = np.array([classes.index(bag.label) for bag in val])
    selection = ModelSelection(patience=len(C_GRID))  # every C is tried
    for index, c in enumerate(C_GRID if val else (1.0,)):
        probe = linear_probe(c, None if settings.imbalance == "none" else "balanced").fit(x, y)
        selection.update({"epoch": index, "C": c}, val_y, _probs(probe, val, len(classes)) if val else None,
                         lambda c=c, probe=probe: (c, probe))
    chosen, probe = selection.best_state
    atomic_write_json(fold_dir / "probe.json", {"C": chosen, "grid": selection.history})
    return _probs(probe, test, len(classes))


def probe_cross_validation(bags: list[SlideBag], classes: list[str], settings: ProbeSettings) -> dict[str, Any]:
    """Every fold's probe (run_folds; settings.level=patient: a bag per patient); the run's metrics."""
    bags = unit_bags(bags, settings.level, settings.data.shards or "the bags")
    by_id = {bag.slide_id: bag for bag in bags}
    extra = {"title": "linear probe on slide embeddings", "model": "linear_probe", "C_grid": list(C_GRID)}
    return run_folds([bag.info for bag in bags], classes, settings, make_accelerator(),
                     lambda fold, fold_dir: probe_fold(fold, by_id, list(classes), settings, fold_dir), extra)


def train_probe_from_shards(description: str | None, argv: list[str] | None = None) -> dict[str, Any]:
    """The body of recipes/linear_probe.py: settings -> slide bags -> cross-validated probes."""
    settings = recipe_settings(ProbeSettings, description, argv, required=("out", "data.shards"))
    bags, classes = read_slide_bags(settings.data.shards)
    return probe_cross_validation(bags, classes, settings)
