"""Patient-grouped, stratified k-fold splits, repeated: the one splitting code path of every slide-level recipe.

For test fold f, fold (f + 1) mod k is the validation part and the rest training, so a patient is never in
two parts. Repeat r reshuffles with a seed derived from (seed, r); repeat 0 uses `seed` itself. Labels with
their own `split` column (train/val/test) give that fixed split instead, as a single fold.
"""
from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from hipt_e2e.data.slides import SlideInfo
from hipt_e2e.errors import UserError
from hipt_e2e.io import atomic_write_text

# Offsets between the repeats' training seeds (Fold.seed_offset): larger than any fold count.
REPEAT_SEED_STRIDE = 1000


class SplitError(UserError, ValueError):
    pass


def check_labels(slides: Sequence[SlideInfo], classes: Sequence[str]) -> None:
    unknown = sorted({s.label for s in slides} - set(classes))
    if unknown:
        examples = [s.slide_id for s in slides if s.label in unknown][:5]
        raise SplitError(f"label(s) {unknown} (slides {examples}) are not in the class list {list(classes)}")


def shuffled_patients(slides: Sequence[SlideInfo], seed: int) -> np.ndarray:
    """Each slide's patient as its rank in a seeded shuffle of the patients (StratifiedGroupKFold's groups).

    Shuffled here, not by StratifiedGroupKFold(shuffle=True), which before scikit-learn 1.8 shuffled the class
    counts but not the patients; these ranks, split unshuffled, give 1.8's folds on every supported version.
    """
    patients, patient_index = np.unique([s.patient_id for s in slides], return_inverse=True)
    order = np.arange(len(patients))
    np.random.RandomState(seed).shuffle(order)
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return rank[patient_index]


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
    splitter = StratifiedGroupKFold(n_splits=n_folds)
    folds = {}
    for fold, (_, test) in enumerate(splitter.split(np.zeros(len(slides)), labels, shuffled_patients(slides, seed))):
        folds.update({slides[i].slide_id: fold for i in test})
    return folds


@dataclass(frozen=True)
class Fold:
    index: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    repeat: int = 0

    @property
    def name(self) -> str:
        """Its output folder: fold_i in the first repeat, else repeat_r_fold_i."""
        return f"fold_{self.index}" if self.repeat == 0 else f"repeat_{self.repeat}_fold_{self.index}"

    @property
    def seed_offset(self) -> int:
        """Added to the run seed for this fold's training draws: distinct for every (repeat, fold)."""
        return self.index + REPEAT_SEED_STRIDE * self.repeat


def repeat_seed(seed: int, repeat: int) -> int:
    """The fold-assignment seed of a repeat: `seed` for repeat 0, one derived from (seed, repeat) after."""
    return seed if repeat == 0 else int(np.random.SeedSequence([seed, repeat]).generate_state(1)[0])


def make_folds(slides: Sequence[SlideInfo], n_folds: int = 5, seed: int = 0, repeats: int = 1) -> list[Fold]:
    """The folds to run, `repeats` x `n_folds` of them in (repeat, fold) order."""
    if all(s.split for s in slides):
        parts = {name: tuple(s.slide_id for s in slides if s.split == name) for name in ("train", "val", "test")}
        unknown = sorted({s.split for s in slides} - set(parts))
        if unknown or not parts["train"] or not parts["test"]:
            raise SplitError(f"the labels' split column must use train/val/test (with train and test non-empty); "
                             f"found {sorted(Counter(s.split for s in slides).items())}")
        if repeats != 1:
            raise SplitError(f"the labels fix one split (their split column); cv.repeats={repeats} cannot repeat it")
        return [Fold(0, parts["train"], parts["val"], parts["test"])]
    if n_folds < 3:
        raise SplitError("need at least 3 folds (train, validation and test parts)")
    if repeats < 1:
        raise SplitError(f"cv.repeats must be at least 1, got {repeats}")
    runs = []
    for repeat in range(repeats):
        folds = assign_folds(slides, n_folds, repeat_seed(seed, repeat))
        for fold in range(n_folds):
            val_fold = (fold + 1) % n_folds
            runs.append(Fold(fold,
                             tuple(s for s, f in folds.items() if f not in (fold, val_fold)),
                             tuple(s for s, f in folds.items() if f == val_fold),
                             tuple(s for s, f in folds.items() if f == fold), repeat))
    return runs


SPLITS_HEADER = "repeat,fold,slide_id,patient_id,label,part"


def write_splits(path: str | Path, slides: Sequence[SlideInfo], folds: Sequence[Fold]) -> None:
    """splits.csv: one row per slide, repeat and fold with its part (train/val/test)."""
    by_id = {s.slide_id: s for s in slides}
    lines = [SPLITS_HEADER]
    for fold in folds:
        for part in ("train", "val", "test"):
            lines += [f"{fold.repeat},{fold.index},{s},{by_id[s].patient_id},{by_id[s].label},{part}"
                      for s in getattr(fold, part)]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_splits(path: str | Path) -> list[Fold]:
    """The folds of a splits.csv (files from before repeats, without that column, are repeat 0)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    parts: dict[tuple[int, int], dict[str, list[str]]] = {}
    for row in rows:
        key = (int(row.get("repeat") or 0), int(row["fold"]))
        parts.setdefault(key, {"train": [], "val": [], "test": []})[row["part"]].append(row["slide_id"])
    return [Fold(fold, *(tuple(parts[(repeat, fold)][part]) for part in ("train", "val", "test")), repeat)
            for repeat, fold in sorted(parts)]
