"""Classification metrics per fold and their mean +- sd over folds."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

SUMMARY_KEYS = ("accuracy", "balanced_accuracy", "auc_macro", "f1_macro")


def macro_auc(y_true: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC; NaN when a fold lacks a class (AUC is undefined there)."""
    n_classes = probs.shape[1]
    if len(np.unique(y_true)) < n_classes:
        return float("nan")
    if n_classes == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average="macro", labels=list(range(n_classes))))


def classification_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Accuracy, balanced accuracy, macro AUC, macro F1, per-class recall/precision, confusion matrix."""
    y_true = np.asarray(y_true)
    probs = np.asarray(probs, dtype=np.float64)
    y_pred = probs.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, _, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "auc_macro": macro_auc(y_true, probs),
        "f1_macro": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "recall": {c: float(r) for c, r in zip(classes, recall)},
        "precision": {c: float(p) for c, p in zip(classes, precision)},
        "support": {c: int(s) for c, s in zip(classes, support)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def selection_key(entry: dict) -> tuple[float, float]:
    """How model selection ranks an epoch's history entry: validation balanced accuracy, then the lower loss."""
    return entry["val_balanced_accuracy"], -entry["val_loss"]


def _mean_sd(values: list[float]) -> dict:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return {"mean": float("nan"), "sd": float("nan"), "n": 0}
    return {"mean": float(np.mean(finite)), "sd": float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0,
            "n": len(finite)}


def summarise_folds(per_fold: Sequence[dict], classes: Sequence[str]) -> dict:
    """Mean +- sd (sample sd over folds) of the headline metrics and of per-class recall/precision."""
    summary = {key: _mean_sd([m[key] for m in per_fold]) for key in SUMMARY_KEYS}
    for key in ("recall", "precision"):
        summary[key] = {c: _mean_sd([m[key][c] for m in per_fold]) for c in classes}
    return summary
