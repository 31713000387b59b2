"""The cross-validation every slide-level model shares, whatever trains it: patient-grouped stratified folds,
the caller's test probabilities per fold, then the outputs that the paired comparison reads."""
from __future__ import annotations

import dataclasses
import json
import logging
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from accelerate import Accelerator

from hipt_e2e.config import Settings, bound, save_config, section
from hipt_e2e.data.slides import Level
from hipt_e2e.errors import UserError
from hipt_e2e.evaluation.metrics import classification_metrics
from hipt_e2e.evaluation.report import write_report
from hipt_e2e.evaluation.splits import Fold, SlideInfo, check_labels, make_folds, write_splits

log = logging.getLogger(__name__)

# How training meets unequal classes: balanced_sampling draws each class equally often, weighted_loss weighs
# each slide's loss by N / N_class (hipt_e2e.training.slide_level: epoch_order, class_weights).
Imbalance = Literal["none", "weighted_loss", "balanced_sampling"]
IMBALANCE: tuple[str, ...] = typing.get_args(Imbalance)


@dataclass(frozen=True)
class Repeats(Settings):
    repeats: int = bound(1, 1)  # repeated cross-validation: repeats x folds, each repeat's split derived from seed


@dataclass(frozen=True)
class FoldSettings(Settings):
    """The top-level settings of a cross-validated run that the fold loop and model selection read; every
    trainer's settings derive from it."""

    out: str | None = None
    seed: int = 0
    folds: int = 5  # patient-grouped stratified folds (make_folds refuses fewer than 3)
    cv: Repeats = section(Repeats)
    imbalance: Imbalance = "none"
    patience: int = bound(5, 0)  # epochs without a better validation balanced accuracy before a fold stops
    level: Level = "slide"  # slide | patient: the unit bagged, labelled, split and predicted (data.slides.units)


def fold_settings(values: Mapping[str, Any]) -> FoldSettings:
    """The cross-validation settings among untyped ones (slide-level training's, a baseline's, a finished
    run's config.yaml), validated; the keys they lack keep FoldSettings' defaults."""
    names = {field.name for field in dataclasses.fields(FoldSettings)}
    return FoldSettings.from_mapping({key: value for key, value in values.items() if key in names})


def run_folds(infos: Sequence[SlideInfo], classes: Sequence[str], run: FoldSettings, accelerator: Accelerator,
              test_probs: Callable[[Fold, Path], np.ndarray], extra: dict[str, Any],
              folds: Sequence[Fold] | None = None, config: Settings | Mapping | None = None) -> dict:
    """Patient-grouped stratified folds of the units `infos` (slides, or patients at run.level=patient: see
    data.slides.units) repeated run.cv.repeats times (or the labels' fixed split, or `folds` read back from an
    earlier run), test_probs(fold, fold_dir) -> [len(fold.test), K] per fold (training is the caller's), then in
    run.out: config.yaml (`config`, default `run`), splits.csv, predictions.csv, metrics.json (per fold with its
    repeat, index and sizes), plots and report.md. Returns the metrics."""
    classes = list(classes)
    out = Path(run.out)
    missing = [info.slide_id for info in infos if info.label is None]
    if missing:
        raise UserError(f"slides without a label cannot be trained on: {missing[:10]}")
    check_labels(infos, classes)
    if folds is None:
        folds = make_folds(infos, run.folds, run.seed, run.cv.repeats)
    by_id = {info.slide_id: info for info in infos}
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(run if config is None else config, out)
        write_splits(out / "splits.csv", infos, folds)
    rows, per_fold = [], []
    for fold in folds:
        probs = test_probs(fold, out / fold.name)
        test = [by_id[s] for s in fold.test]
        per_fold.append({"repeat": fold.repeat, "fold": fold.index, "n_train": len(fold.train) + len(fold.val),
                         **classification_metrics([classes.index(info.label) for info in test], probs, classes)})
        rows += [{"slide_id": info.slide_id, "patient_id": info.patient_id, "repeat": fold.repeat,
                  "fold": fold.index, "true_label": info.label, "probs": p.tolist()} for info, p in zip(test, probs)]
        log.info("%s: test balanced accuracy %.3f, macro AUC %.3f", fold.name,
                 per_fold[-1]["balanced_accuracy"], per_fold[-1]["auc_macro"])
    metrics = {}
    if accelerator.is_main_process:
        repeats = folds[-1].repeat + 1
        level = {"level": run.level} if run.level != "slide" else {}  # slide-level outputs as before the setting
        extra = {**extra, **level, "imbalance": run.imbalance, "seed": run.seed, "n_folds": len(folds) // repeats,
                 "repeats": repeats, "processes": accelerator.num_processes}
        histories = {fold.name: json.loads((out / fold.name / "history.json").read_text())
                     for fold in folds if (out / fold.name / "history.json").is_file()}
        metrics = write_report(out, rows, per_fold, classes, extra, histories)
        summary = metrics["summary"]
        log.info("balanced accuracy %.3f +- %.3f, macro AUC %.3f +- %.3f over %d folds -> %s",
                 summary["balanced_accuracy"]["mean"], summary["balanced_accuracy"]["sd"],
                 summary["auc_macro"]["mean"], summary["auc_macro"]["sd"], len(folds), out / "report.md")
    accelerator.wait_for_everyone()
    return metrics or json.loads((out / "metrics.json").read_text())
