"""Outputs of a slide-level run: predictions.csv, metrics.json, confusion/ROC plots and report.md."""
from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay, RocCurveDisplay  # noqa: E402

from hipt_e2e.evaluation.metrics import (  # noqa: E402
    SUMMARY_KEYS,
    classification_metrics,
    selection_key,
    summarise_folds,
)
from hipt_e2e.io import atomic_open, atomic_write_json, atomic_write_text  # noqa: E402


def write_predictions(path: Path, rows: Sequence[dict], classes: Sequence[str]) -> None:
    """One row per slide and repeat: slide_id, patient_id, repeat, fold, true_label, prob_<class>..., predicted."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["slide_id", "patient_id", "repeat", "fold", "true_label", *[f"prob_{c}" for c in classes],
                     "predicted_label"])
    for row in rows:
        probs = row["probs"]
        writer.writerow([row["slide_id"], row["patient_id"], row.get("repeat", 0), row["fold"], row["true_label"],
                         *[f"{p:.6f}" for p in probs], classes[int(np.argmax(probs))]])
    atomic_write_text(path, buffer.getvalue())


def save_figure(figure: plt.Figure, path: Path, dpi: int = 120) -> None:
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(figure)


def plot_confusion(path: Path, y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]) -> None:
    figure, axis = plt.subplots(figsize=(1.2 * len(classes) + 2.5, 1.2 * len(classes) + 2))
    ConfusionMatrixDisplay.from_predictions(y_true, y_pred, labels=list(range(len(classes))),
                                            display_labels=list(classes), ax=axis, colorbar=False)
    axis.set_title("confusion matrix (test folds pooled)")
    save_figure(figure, path)


def plot_roc(path: Path, y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> None:
    figure, axis = plt.subplots(figsize=(5, 5))
    for index, name in enumerate(classes):
        if 0 < (y_true == index).sum() < len(y_true):
            RocCurveDisplay.from_predictions(y_true == index, probs[:, index], name=f"{name} vs rest", ax=axis)
    axis.plot([0, 1], [0, 1], ls=":", c="grey")
    axis.set_title("ROC, one vs rest (test folds pooled)")
    save_figure(figure, path)


def plot_learning_curves(path: Path, histories: dict[str, list[dict]]) -> None:
    """Per fold: training and validation loss and validation balanced accuracy by epoch, the selected one marked."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    keys = (("train_loss", "training loss (mean over the epoch's steps)"), ("val_loss", "validation loss"),
            ("val_balanced_accuracy", "validation balanced accuracy"))
    for name, history in histories.items():
        epochs = [entry["epoch"] for entry in history]
        for axis, (key, _) in zip(axes, keys):
            if all(key in entry for entry in history):
                line, = axis.plot(epochs, [entry[key] for entry in history], label=name, lw=1.2)
        if all("val_balanced_accuracy" in entry for entry in history):
            best = max(history, key=selection_key)
            axes[2].plot(best["epoch"], best["val_balanced_accuracy"], "o", color=line.get_color())
    for axis, (_, title) in zip(axes, keys):
        axis.set_xlabel("epoch")
        axis.set_title(title)
    axes[2].legend(fontsize=7, loc="lower right")
    save_figure(figure, path)


def format_stat(stat: dict) -> str:
    return f"{stat['mean']:.3f} +- {stat['sd']:.3f}"


def write_report(out_dir: str | Path, rows: Sequence[dict], per_fold: Sequence[dict], classes: Sequence[str],
                 extra: dict[str, Any] | None = None, histories: dict[str, list[dict]] | None = None) -> dict:
    """Write every output of a run, returning the metrics (metrics.json); histories: plotted when given."""
    out_dir, extra = Path(out_dir), extra or {}
    out_dir.mkdir(parents=True, exist_ok=True)
    y_true = np.array([classes.index(r["true_label"]) for r in rows])
    probs = np.array([r["probs"] for r in rows])
    metrics = {"classes": list(classes), "folds": list(per_fold), "summary": summarise_folds(per_fold, classes),
               "pooled": classification_metrics(y_true, probs, classes), **extra}
    write_predictions(out_dir / "predictions.csv", rows, classes)
    atomic_write_json(out_dir / "metrics.json", metrics)
    plot_confusion(out_dir / "confusion_matrix.png", y_true, probs.argmax(axis=1), classes)
    plot_roc(out_dir / "roc.png", y_true, probs, classes)
    summary = metrics["summary"]
    lines = [f"# {extra.get('title', 'Slide-level results')}", "",
             f"{len(rows)} {extra.get('level', 'slide')}s, {len(per_fold)} fold(s); mean +- sd over folds.", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {key} | {format_stat(summary[key])} |" for key in SUMMARY_KEYS]
    lines += ["", "| class | recall | precision |", "|---|---|---|"]
    lines += [f"| {c} | {format_stat(summary['recall'][c])} | {format_stat(summary['precision'][c])} |" for c in classes]
    lines += ["", "Confusion matrix (rows true, columns predicted, test folds pooled):", "",
              "| | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]
    lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |"
              for c, row in zip(classes, metrics["pooled"]["confusion_matrix"])]
    lines += ["", "![confusion](confusion_matrix.png) ![roc](roc.png)", ""]
    if histories:
        plot_learning_curves(out_dir / "learning_curves.png", histories)
        epochs = [len(h) for h in histories.values()]
        lines += [f"Learning curves ({min(epochs)}-{max(epochs)} epochs per fold; dots: the selected epoch):", "",
                  "![learning curves](learning_curves.png)", ""]
    lines += [f"- {key}: {value}" for key, value in extra.items() if key != "title"]
    atomic_write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    return metrics
