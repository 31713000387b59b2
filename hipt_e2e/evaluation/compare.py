"""Paired comparison of variants cross-validated on identical splits: is A better than B, and by how much?

The mean per-fold difference metric(A) - metric(B) gets a CI from the corrected resampled t-test (Nadeau &
Bengio 2003: the folds' training sets overlap, so the variance is (1 / (R*K) + n_test / n_train) * s^2);
beside it a Wilcoxon p-value and each variant's pooled metric with a bootstrap CI over slides.

    python -m hipt_e2e.evaluation.compare RUN_A RUN_B [...] [--metric balanced_accuracy auc_macro] [--ensemble-repeats]
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.metrics import balanced_accuracy_score

from hipt_e2e.config import HelpFormatter
from hipt_e2e.errors import UserError, run_main
from hipt_e2e.evaluation.metrics import classification_metrics, macro_auc
from hipt_e2e.evaluation.splits import read_splits

METRIC_NAMES = {"balanced_accuracy": "balanced accuracy", "auc_macro": "macro AUC",
                "minority_recall": "mean recall of the minority classes"}
METRIC_FUNCTIONS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "balanced_accuracy": lambda y, probs: float(balanced_accuracy_score(y, probs.argmax(axis=1))),
    "auc_macro": macro_auc,
}
LEVEL = 0.95


class SplitMismatch(UserError, ValueError):
    """Variants that were not evaluated on identical splits cannot be paired."""


def _signed(value: float) -> str:
    return f"{value:+.3f}"


@dataclass(frozen=True)
class PairedDifference:
    """metric(a) - metric(b) on each of the R*K test folds both variants were scored on."""
    a: str
    b: str
    metric: str
    differences: tuple[float, ...]
    test_train_ratio: float  # mean n_test / n_train over the folds
    level: float = LEVEL

    @property
    def mean(self) -> float:
        return float(np.mean(self.differences))

    def interval(self, corrected: bool = True) -> tuple[float, float]:
        """Two-sided t interval of the mean difference; corrected=False: the naive one (ignores overlap)."""
        d = np.asarray(self.differences)
        n = len(d)
        if n < 2:
            return (-math.inf, math.inf)
        variance = np.var(d, ddof=1) * (1.0 / n + (self.test_train_ratio if corrected else 0.0))
        half = stats.t.ppf(0.5 + self.level / 2, df=n - 1) * math.sqrt(variance)
        return self.mean - half, self.mean + half

    @cached_property
    def p_wilcoxon(self) -> float:
        """Two-sided Wilcoxon signed-rank p-value of the differences (1.0 when every difference is 0)."""
        d = np.asarray(self.differences)
        if not np.any(d != 0):
            return 1.0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # small samples: scipy warns that it switches methods
            return float(stats.wilcoxon(d, zero_method="zsplit").pvalue)

    @property
    def separated(self) -> bool:
        low, high = self.interval()
        return low > 0 or high < 0

    def sentence(self) -> str:
        """The report's sentence: who beats whom by how much with the corrected CI, or 'not separated'."""
        low, high = self.interval()
        name = METRIC_NAMES.get(self.metric, self.metric.replace("_", " "))
        ci = f"{self.level:.0%}".replace("%", " %")
        if not self.separated:
            return (f"{self.a} and {self.b} are not separated on {name} (difference {_signed(self.mean)}, "
                    f"{ci} CI {_signed(low)} to {_signed(high)}).")
        winner, loser, sign = (self.a, self.b, 1) if self.mean > 0 else (self.b, self.a, -1)
        low, high = sorted((sign * low, sign * high))
        return f"{winner} beats {loser} by {_signed(sign * self.mean)} {name} ({ci} CI {_signed(low)} to {_signed(high)})."

    def row(self) -> str:
        """Markdown row: pair | metric | mean | corrected CI | naive CI | Wilcoxon p | folds."""
        (low, high), (naive_low, naive_high) = self.interval(), self.interval(corrected=False)
        return (f"| {self.a} - {self.b} | {METRIC_NAMES.get(self.metric, self.metric)} | {_signed(self.mean)} | "
                f"{_signed(low)} to {_signed(high)} | {_signed(naive_low)} to {_signed(naive_high)} | "
                f"{self.p_wilcoxon:.3f} | {len(self.differences)} |")


PAIRED_HEADER = ["| A - B | metric | mean difference | 95 % CI (corrected) | 95 % CI (naive) | Wilcoxon p | folds |",
                 "|---|---|---|---|---|---|---|"]


def paired_difference(a: str, a_folds: Sequence[Mapping], b: str, b_folds: Sequence[Mapping],
                      metric: str = "balanced_accuracy") -> PairedDifference:
    """Pair two variants' per-fold metrics (metrics.json's "folds"); folds where either is NaN are left out."""
    by_key = [{(int(entry.get("repeat", 0)), int(entry["fold"])): entry for entry in folds}
              for folds in (a_folds, b_folds)]
    if set(by_key[0]) != set(by_key[1]):
        raise SplitMismatch(f"{a} and {b} were scored on different folds: {sorted(set(by_key[0]) ^ set(by_key[1]))}")
    differences, ratios = [], []
    for key in sorted(by_key[0]):
        first, second = by_key[0][key], by_key[1][key]
        if (first["n"], first["n_train"]) != (second["n"], second["n_train"]):
            raise SplitMismatch(f"{a} and {b}: repeat {key[0]} fold {key[1]} has different test/training sizes "
                                f"({first['n']}/{first['n_train']} vs {second['n']}/{second['n_train']})")
        if not (math.isnan(first[metric]) or math.isnan(second[metric])):
            differences.append(first[metric] - second[metric])
            ratios.append(first["n"] / first["n_train"])
    if not differences:
        raise UserError(f"{metric} is undefined on every fold of {a} and {b}")
    return PairedDifference(a, b, metric, tuple(differences), float(np.mean(ratios)))


def comparisons(variants: Mapping[str, Sequence[Mapping]], metric: str = "balanced_accuracy",
                reference: str | None = None) -> list[PairedDifference]:
    """Every pair of variants (first named first), or each variant against `reference`."""
    pairs = list(combinations(variants, 2)) if reference is None else [(reference, n) for n in variants if n != reference]
    return [paired_difference(x, variants[x], y, variants[y], metric) for x, y in pairs]


def best_against_rest(variants: Mapping[str, Mapping], metric: str = "balanced_accuracy") -> list[PairedDifference]:
    """The variant with the highest mean `metric` over folds against every other (metrics.json dicts)."""
    best = max(variants, key=lambda name: np.nanmean([f[metric] for f in variants[name]["folds"]]))
    return comparisons({name: m["folds"] for name, m in variants.items()}, metric, reference=best)


@dataclass(frozen=True)
class Run:
    """A finished cross-validated run: its test predictions and its splits."""
    name: str
    classes: tuple[str, ...]
    repeat: np.ndarray  # per prediction row
    fold: np.ndarray
    slide_id: np.ndarray
    y_true: np.ndarray
    probs: np.ndarray
    splits: frozenset[tuple[int, int, str, str]]  # (repeat, fold, slide id, part)

    def fold_metrics(self) -> list[dict]:
        """Per test fold: repeat, fold, n_train (train + validation slides) and classification_metrics."""
        n_train = Counter((repeat, fold) for repeat, fold, _, part in self.splits if part in ("train", "val"))
        out = []
        for repeat, fold in sorted(set(zip(self.repeat.tolist(), self.fold.tolist()))):
            rows = (self.repeat == repeat) & (self.fold == fold)
            out.append({"repeat": repeat, "fold": fold, "n_train": n_train[(repeat, fold)],
                        **classification_metrics(self.y_true[rows], self.probs[rows], self.classes)})
        return out

    def repeat_ensemble(self) -> Run:
        """One prediction per slide, its test probabilities averaged over the repeats (R models none of which
        saw it). Folds and splits are repeat 0's, so the overlap correction of the paired test is approximate."""
        order = self.rows_by_repeat()
        first = order[0]
        return Run(self.name, self.classes, np.zeros(len(first), dtype=int), self.fold[first], self.slide_id[first],
                   self.y_true[first], np.stack([self.probs[rows] for rows in order]).mean(axis=0),
                   frozenset(entry for entry in self.splits if entry[0] == self.repeat.min()))

    def rows_by_repeat(self) -> list[np.ndarray]:
        """Per repeat, the indices of its prediction rows sorted by slide id (position i: the same slide in each)."""
        return [np.flatnonzero(self.repeat == r)[np.argsort(self.slide_id[self.repeat == r])]
                for r in np.unique(self.repeat)]

    def pooled(self, metric: str, n_boot: int = 1000, seed: int = 0, level: float = LEVEL) -> tuple[float, float, float]:
        """Pooled out-of-fold metric (per repeat, averaged) and its percentile bootstrap CI over slides."""
        function = METRIC_FUNCTIONS[metric]
        slides = np.unique(self.slide_id)
        order = self.rows_by_repeat()  # in the order of `slides`

        def value(index: np.ndarray) -> float:
            return float(np.mean([function(self.y_true[rows[index]], self.probs[rows[index]]) for rows in order]))

        rng = np.random.default_rng(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # resamples that miss a class
            draws = np.array([value(rng.integers(0, len(slides), len(slides))) for _ in range(n_boot)])
        draws = draws[~np.isnan(draws)]
        tail = (1 - level) / 2 * 100
        return value(np.arange(len(slides))), float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))


def load_run(path: str | Path, name: str | None = None) -> Run:
    """A run directory's predictions.csv and splits.csv (a clear error when either is missing)."""
    path = Path(path)
    for needed in ("predictions.csv", "splits.csv"):
        if not (path / needed).is_file():
            raise FileNotFoundError(f"{path / needed} not found: {path} is not a finished cross-validated run")
    with open(path / "predictions.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    classes = tuple(column[len("prob_"):] for column in rows[0] if column.startswith("prob_"))
    splits = frozenset((fold.repeat, fold.index, slide, part) for fold in read_splits(path / "splits.csv")
                       for part in ("train", "val", "test") for slide in getattr(fold, part))
    return Run(name or path.name, classes,
               np.array([int(r.get("repeat") or 0) for r in rows]), np.array([int(r["fold"]) for r in rows]),
               np.array([r["slide_id"] for r in rows]), np.array([classes.index(r["true_label"]) for r in rows]),
               np.array([[float(r[f"prob_{c}"]) for c in classes] for r in rows]), splits)


def check_same_splits(runs: Sequence[Run]) -> None:
    """Raise SplitMismatch naming the first difference when the runs' splits or classes differ."""
    first = runs[0]
    for other in runs[1:]:
        if other.classes != first.classes:
            raise SplitMismatch(f"{first.name} and {other.name} have different classes: {first.classes} vs {other.classes}")
        if other.splits != first.splits:
            example = sorted(first.splits ^ other.splits)[0]
            owner = first.name if example in first.splits else other.name
            raise SplitMismatch(f"{first.name} and {other.name} were not run on identical splits: e.g. only "
                                f"{owner} has slide {example[2]!r} in the {example[3]} part of repeat {example[0]} "
                                f"fold {example[1]}; pair variants run with the same folds, seed and cv.repeats")


def run_labels(paths: Sequence[str | Path]) -> list[str]:
    """Each run folder's label: the fewest trailing parts of its path that tell it apart (runs/seed0/run,
    runs/seed1/run -> seed0/run, seed1/run). The same folder given twice is refused."""
    resolved = [Path(path).resolve() for path in paths]
    for index, path in enumerate(resolved):
        if path in resolved[:index]:
            raise UserError(f"{paths[index]} is given twice (as {paths[resolved.index(path)]}): "
                             "a run compared with itself says nothing")
    return [_shortest_unique_suffix(path, [other for other in resolved if other != path]) for path in resolved]


def _shortest_unique_suffix(path: Path, others: Sequence[Path]) -> str:
    """Distinct resolved paths differ somewhere, so some depth tells them apart."""
    depth = next(d for d in range(1, len(path.parts) + 1) if all(other.parts[-d:] != path.parts[-d:] for other in others))
    return Path(*path.parts[-depth:]).as_posix()


def compare_runs(runs: Sequence[Run], metrics: Sequence[str] = ("balanced_accuracy", "auc_macro"),
                 n_boot: int = 1000) -> tuple[list[str], list[PairedDifference]]:
    """Markdown lines (per-variant table, paired table, sentences) and the balanced-accuracy pairs."""
    names = [run.name for run in runs]
    if len(set(names)) < len(names):
        raise UserError(f"runs need distinct names to be told apart in the tables, got {names}")
    check_same_splits(runs)
    folds = {run.name: run.fold_metrics() for run in runs}
    n_folds = len(next(iter(folds.values())))
    lines = ["| variant | " + " | ".join(f"{METRIC_NAMES[m]} (mean +- sd over {n_folds} folds) | "
                                         f"pooled {METRIC_NAMES[m]} [95 % bootstrap CI]" for m in metrics) + " |",
             "|---|" + "---|---|" * len(metrics)]
    for run in runs:
        cells = []
        for metric in metrics:
            values = np.array([f[metric] for f in folds[run.name]])
            value, low, high = run.pooled(metric, n_boot)
            cells += [f"{np.nanmean(values):.3f} +- {np.nanstd(values, ddof=1):.3f}", f"{value:.3f} [{low:.3f}, {high:.3f}]"]
        lines.append(f"| {run.name} | " + " | ".join(cells) + " |")
    pairs = {metric: comparisons(folds, metric) for metric in metrics}
    lines += ["", *PAIRED_HEADER, *[pair.row() for metric in metrics for pair in pairs[metric]], ""]
    lines += [pair.sentence() for metric in metrics for pair in pairs[metric]]
    return lines, pairs[metrics[0]]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run directories (predictions.csv, splits.csv)")
    parser.add_argument("--names", nargs="+",
                        help="a name per run (default: the fewest trailing parts of each path that tell them apart)")
    parser.add_argument("--metric", nargs="+", default=["balanced_accuracy", "auc_macro"], choices=list(METRIC_NAMES),
                        help="metrics to tabulate and pair, the first one decides")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the pooled metrics")
    parser.add_argument("--ensemble-repeats", action="store_true",
                        help="score each run's repeat ensemble: a slide's test probabilities averaged over repeats")
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("give at least two runs to compare")
    names = args.names or run_labels(args.runs)
    if len(names) != len(args.runs):
        parser.error(f"--names has {len(names)} names for {len(args.runs)} runs")
    runs = [load_run(path, name) for path, name in zip(args.runs, names)]
    if args.ensemble_repeats:
        runs = [run.repeat_ensemble() for run in runs]
    lines, _ = compare_runs(runs, args.metric, args.bootstrap)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(run_main(main))
