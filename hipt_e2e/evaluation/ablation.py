"""Ablation reports: variants run on the same folds and seeds, compared in one table and one plot
(`docs/ablations/<name>.md`, with the paired comparison, the command, runtime, machine and the answer)."""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from accelerate import PartialState

from hipt_e2e.evaluation.compare import PAIRED_HEADER, best_against_rest
from hipt_e2e.evaluation.metrics import selection_key
from hipt_e2e.evaluation.report import format_stat, save_figure  # (it selects matplotlib's Agg backend)
from hipt_e2e.io import atomic_write_json, atomic_write_text


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} CPU cores"


def command_line(processes: int = 1, cpu: bool = False) -> str:
    """The command that ran this script; with several processes, behind the accelerate launch that starts them."""
    script = " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    if processes == 1:
        return script
    return ("ACCELERATE_USE_CPU=true " if cpu else "") + f"accelerate launch --multi_gpu --num_processes {processes} {script}"


def _cell(stat: dict) -> str:
    return "n/a" if stat["n"] == 0 else format_stat(stat)


def results_table(variants: dict[str, dict], classes: Sequence[str]) -> list[str]:
    """Markdown rows: variant | balanced accuracy | macro AUC | recall per class (mean +- sd over folds)."""
    lines = ["| variant | balanced accuracy | macro AUC | " + " | ".join(f"recall {c}" for c in classes) + " |",
             "|---|---|---|" + "---|" * len(classes)]
    for name, metrics in variants.items():
        summary = metrics["summary"]
        lines.append(f"| {name} | {_cell(summary['balanced_accuracy'])} | {_cell(summary['auc_macro'])} | "
                     + " | ".join(_cell(summary["recall"][c]) for c in classes) + " |")
    return lines


def paired_table(variants: dict[str, dict]) -> list[str]:
    """Markdown rows of the paired comparison (best variant against every other, both headline metrics)."""
    return [*PAIRED_HEADER, *[pair.row() for metric in ("balanced_accuracy", "auc_macro")
                              for pair in best_against_rest(variants, metric)]]


def bar_plot(path: Path, variants: dict[str, dict], metric: str = "balanced_accuracy") -> Path:
    names = list(variants)
    means = [variants[n]["summary"][metric]["mean"] for n in names]
    sds = [variants[n]["summary"][metric]["sd"] for n in names]
    figure, axis = plt.subplots(figsize=(max(5, 1.1 * len(names)), 4))
    axis.bar(range(len(names)), means, yerr=sds, capsize=4, color="#4c72b0")
    axis.set_xticks(range(len(names)), names, rotation=30, ha="right")
    axis.set_ylabel(f"{metric.replace('_', ' ')} (mean +- sd over folds)")
    axis.set_ylim(0, 1)
    save_figure(figure, path, dpi=110)
    return path


def folds_text(folds: int, repeats: int, seed: int) -> str:
    """How a run was cross-validated, for the reports' setup: "5 patient-grouped folds x 3 repeats (seed 0)"."""
    return (f"{folds} patient-grouped stratified folds" + (f" x {repeats} repeats" if repeats > 1 else "")
            + f" (seed {seed})")


def fold_histories(run_dir: str | Path) -> list[list[dict]]:
    """Each fold's per-epoch history (history.json of fold_i/ and repeat_r_fold_i/) of a cross-validated run."""
    return [json.loads(path.read_text()) for path in sorted(Path(run_dir).glob("*fold_*/history.json"))]


def convergence_table(run_dirs: Mapping[str, str | Path]) -> list[str]:
    """Markdown rows: how long each variant's folds trained and where their selected epochs lie (a variant whose
    folds select their last epochs was still improving) with their validation score, which choices are made on."""
    lines = ["| variant | folds | epochs trained (min-max) | selected epoch (median) | folds selecting one of their last 3 epochs "
             "| validation balanced accuracy of the selected epochs (mean) |",
             "|---|---|---|---|---|---|"]
    for name, run_dir in run_dirs.items():
        histories = [h for h in fold_histories(run_dir) if h]
        if not histories:
            continue
        trained = [len(h) for h in histories]
        best = [max(h, key=selection_key) for h in histories]
        selected = [entry["epoch"] for entry in best]
        late = sum(pick >= h[-1]["epoch"] - 2 for pick, h in zip(selected, histories))
        validation = np.mean([entry.get("val_balanced_accuracy", np.nan) for entry in best])
        lines.append(f"| {name} | {len(histories)} | {min(trained)}-{max(trained)} | {np.median(selected):.0f} | "
                     f"{late} of {len(histories)} | {validation:.3f} |")
    return lines


def variant_curves(path: Path, run_dirs: Mapping[str, str | Path]) -> Path:
    """Training loss and validation balanced accuracy per epoch, each variant's mean over its folds still training."""
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, run_dir in run_dirs.items():
        histories = [h for h in fold_histories(run_dir) if h]
        longest = max((len(h) for h in histories), default=0)
        for axis, key in zip(axes, ("train_loss", "val_balanced_accuracy")):
            means = [np.mean([h[e][key] for h in histories if len(h) > e and key in h[e]] or [np.nan])
                     for e in range(longest)]
            axis.plot(range(longest), means, label=name, lw=1.3)
    for axis, title in zip(axes, ("training loss (mean over folds)", "validation balanced accuracy (mean over folds)")):
        axis.set_xlabel("epoch")
        axis.set_title(title)
    axes[1].legend(fontsize=7, loc="lower right")
    save_figure(figure, path, dpi=110)
    return path


def write_ablation(docs_dir: str | Path, name: str, title: str, question: str, variants: dict[str, dict],
                   classes: Sequence[str], *, answer: str, runtime_s: float, setup: str,
                   plot: Path | None = None, extra_lines: Sequence[str] = (),
                   run_dirs: Mapping[str, str | Path] | None = None, lab_scale: str = "") -> Path:
    """docs/ablations/<name>.md + <name>.json (+ <name>.png unless a plot is given); with run folders, learning
    curves and a convergence table too; `lab_scale`: what would change at a lab's scale (slides, GPUs)."""
    docs_dir, state = Path(docs_dir), PartialState()
    docs_dir.mkdir(parents=True, exist_ok=True)
    plot = plot or bar_plot(docs_dir / f"{name}.png", variants)
    if run_dirs and any(fold_histories(run_dir) for run_dir in run_dirs.values()):
        curves = variant_curves(docs_dir / f"{name}_curves.png", run_dirs)
        extra_lines = [*extra_lines, "Learning curves of every variant (test folds never enter them):", "",
                       *convergence_table(run_dirs), "", f"![{name} learning curves]({curves.name})", ""]
    atomic_write_json(docs_dir / f"{name}.json", {"classes": list(classes), "variants": variants})
    # question, setup, evidence, then the answer last: the report ends in the paired sentences with their CIs
    lines = [f"# {title}", "", f"**Question.** {question}", "",
             f"**Setup.** {setup}", "", *results_table(variants, classes), "", *paired_table(variants), "",
             *extra_lines,
             f"![{name}]({plot.name})", "",
             f"Command: `{command_line(state.num_processes, state.device.type == 'cpu')}`", "",
             f"Runtime: {runtime_s / 60:.1f} min on {machine()}. Raw metrics per fold: `{name}.json`.", "",
             *([f"**At the lab's scale.** {lab_scale}", ""] if lab_scale else []),
             f"**Answer.** {answer}", ""]
    path = docs_dir / f"{name}.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def with_mean_recall(variants: Mapping[str, Mapping], classes: Sequence[str], metric: str) -> dict[str, dict]:
    """The variants' metrics with `metric` added to every fold: the mean recall of `classes` (e.g. the minority
    classes), to be paired like balanced accuracy."""
    return {name: {**metrics, "folds": [{**fold, metric: float(np.mean([fold["recall"][c] for c in classes]))}
                                        for fold in metrics["folds"]]}
            for name, metrics in variants.items()}


def paired_answer(variants: dict[str, dict], metric: str = "balanced_accuracy") -> str:
    """The sentences of the paired comparison of the best variant against every other (corrected CIs)."""
    return " ".join(pair.sentence() for pair in best_against_rest(variants, metric))
