"""Patient-grouped, stratified k-fold splits: the one splitting code path of every slide-level recipe.

Each slide gets one test fold. For test fold f, fold (f + 1) mod k is the validation part (model
selection, early stopping) and the rest is training, so a patient is never in two parts and every slide
is in exactly one test fold. When the labels carry their own `split` column (train/val/test), that fixed
split is used instead, as a single fold.
"""
from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from hipt_e2e.io import atomic_write_text


@dataclass(frozen=True)
class SlideInfo:
    slide_id: str
    label: str
    patient_id: str
    split: str | None = None


class SplitError(ValueError):
    pass


def check_labels(slides: Sequence[SlideInfo], classes: Sequence[str]) -> None:
    unknown = sorted({s.label for s in slides} - set(classes))
    if unknown:
        examples = [s.slide_id for s in slides if s.label in unknown][:5]
        raise SplitError(f"label(s) {unknown} (slides {examples}) are not in the class list {list(classes)}")


def assign_folds(slides: Sequence[SlideInfo], n_folds: int, seed: int) -> dict[str, int]:
    """slide id -> test fold, stratified by label and grouped by patient."""
    patients_per_class: dict[str, set] = {}
    for slide in slides:
        patients_per_class.setdefault(slide.label, set()).add(slide.patient_id)
    too_few = {label: len(p) for label, p in patients_per_class.items() if len(p) < n_folds}
    if too_few:
        raise SplitError(f"class(es) with fewer patients than the {n_folds} folds asked for: {too_few}; "
                         "use fewer folds or more data")
    # Slide-id order: the folds depend on the set of slides and the seed, never on the order they were
    # read in (shards are written in a shuffled order; other tools list slides their own way).
    slides = sorted(slides, key=lambda s: s.slide_id)
    labels = np.array([s.label for s in slides])
    groups = np.array([s.patient_id for s in slides])
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    folds = {}
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(slides)), labels, groups)):
        folds.update({slides[i].slide_id: fold for i in test})
    return folds


@dataclass(frozen=True)
class Fold:
    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def make_folds(slides: Sequence[SlideInfo], n_folds: int = 5, seed: int = 0) -> tuple[list[Fold], dict[str, int]]:
    """The folds to run and the slide -> test-fold map written to splits.csv."""
    if all(s.split for s in slides):
        parts = {name: tuple(s.slide_id for s in slides if s.split == name) for name in ("train", "val", "test")}
        unknown = sorted({s.split for s in slides} - set(parts))
        if unknown or not parts["train"] or not parts["test"]:
            raise SplitError(f"the labels' split column must use train/val/test (with train and test non-empty); "
                             f"found {sorted(Counter(s.split for s in slides).items())}")
        return [Fold(0, parts["train"], parts["val"], parts["test"])], {s: 0 for s in parts["test"]}
    if n_folds < 3:
        raise SplitError("need at least 3 folds (train, validation and test parts)")
    folds = assign_folds(slides, n_folds, seed)
    runs = []
    for fold in range(n_folds):
        val_fold = (fold + 1) % n_folds
        runs.append(Fold(fold,
                         tuple(s for s, f in folds.items() if f not in (fold, val_fold)),
                         tuple(s for s, f in folds.items() if f == val_fold),
                         tuple(s for s, f in folds.items() if f == fold)))
    return runs, folds


def write_splits(path: str | Path, slides: Sequence[SlideInfo], folds: Sequence[Fold]) -> None:
    """splits.csv: one row per slide and fold with its part (train/val/test)."""
    by_id = {s.slide_id: s for s in slides}
    lines = ["fold,slide_id,patient_id,label,part"]
    for fold in folds:
        for part in ("train", "val", "test"):
            lines += [f"{fold.index},{s},{by_id[s].patient_id},{by_id[s].label},{part}" for s in getattr(fold, part)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_splits(path: str | Path) -> list[Fold]:
    rows = list(csv.DictReader(open(path, newline="")))
    folds = sorted({int(r["fold"]) for r in rows})
    return [Fold(f, *(tuple(r["slide_id"] for r in rows if int(r["fold"]) == f and r["part"] == part)
                      for part in ("train", "val", "test"))) for f in folds]
