"""Paired repeated cross-validation: known answers of the corrected t interval, and whole runs compared."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from accelerate import Accelerator
from scipy import stats

from hipt_e2e.data.slides import SlideInfo
from hipt_e2e.errors import UserError
from hipt_e2e.evaluation.compare import PairedDifference, SplitMismatch, load_run, main, paired_difference, run_labels
from hipt_e2e.evaluation.splits import Fold
from hipt_e2e.training.folds import FoldSettings, run_folds

CLASSES = ["a", "b", "c"]


def fold_entries(values, n=20, n_train=60, repeats=3, folds=5):
    return [{"repeat": r, "fold": k, "n": n, "n_train": n_train, "balanced_accuracy": values[r * folds + k]}
            for r in range(repeats) for k in range(folds)]


def test_identical_variants_are_not_separated():
    values = np.random.default_rng(0).uniform(0.6, 0.9, 15)
    pair = paired_difference("A", fold_entries(values), "B", fold_entries(values))
    low, high = pair.interval()
    assert low <= 0 <= high and not pair.separated and pair.p_wilcoxon == 1.0
    assert pair.sentence() == "A and B are not separated on balanced accuracy (difference +0.000, 95 % CI +0.000 to +0.000)."
    # two variants of the same quality with independent fold noise: still not separated
    other = np.random.default_rng(1).uniform(0.6, 0.9, 15)
    pair = paired_difference("A", fold_entries(values), "B", fold_entries(other))
    assert pair.interval()[0] < 0 < pair.interval()[1] and pair.sentence().startswith("A and B are not separated")


def test_constant_offset_is_separated_with_the_right_sign():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.6, 0.8, 15)
    better = base + 0.05 + rng.normal(0, 0.005, 15)
    pair = paired_difference("A", fold_entries(base), "B", fold_entries(better))
    low, high = pair.interval()
    assert high < 0 and pair.separated and pair.mean == pytest.approx(-0.05, abs=0.005)
    assert pair.p_wilcoxon < 0.001  # 15 of 15 differences negative
    assert pair.sentence() == (f"B beats A by +{-pair.mean:.3f} balanced accuracy "
                               f"(95 % CI +{-high:.3f} to +{-low:.3f}).")
    reverse = paired_difference("B", fold_entries(better), "A", fold_entries(base))
    assert reverse.interval()[0] > 0 and reverse.sentence() == pair.sentence()


def test_corrected_interval_known_answer_and_wider_than_naive():
    d = np.array([0.02, 0.05, -0.01, 0.04, 0.03, 0.00, 0.06, 0.01, 0.02, 0.05])  # R x K = 2 x 5
    pair = PairedDifference("A", "B", "balanced_accuracy", tuple(d), test_train_ratio=0.25)
    mean, sd, n = d.mean(), d.std(ddof=1), len(d)
    # Nadeau & Bengio / Bouckaert & Frank: variance (1/n + n_test/n_train) s^2, t with n - 1 df
    half = stats.t.ppf(0.975, n - 1) * math.sqrt((1 / n + 0.25) * sd ** 2)
    assert pair.interval() == pytest.approx((mean - half, mean + half))
    naive = stats.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n))
    assert pair.interval(corrected=False) == pytest.approx(naive)
    width, naive_width = (hi - lo for lo, hi in (pair.interval(), naive))
    assert width / naive_width == pytest.approx(math.sqrt((1 / n + 0.25) / (1 / n)))
    # naive alone would call it (0 excluded); the corrected interval does not
    assert naive[0] > 0 and pair.interval()[0] < 0 and not pair.separated


def test_differing_folds_are_refused():
    values = np.linspace(0.5, 0.9, 15)
    with pytest.raises(SplitMismatch, match="different folds"):
        paired_difference("A", fold_entries(values), "B", fold_entries(values)[:10])
    with pytest.raises(SplitMismatch, match="different test/training sizes"):
        paired_difference("A", fold_entries(values), "B", fold_entries(values, n_train=50))


def simulated_run(out: Path, infos: list[SlideInfo], skill: float, seed: int, repeats: int = 2) -> dict:
    """A cross-validated run through run_folds whose 'model' is right with probability `skill`."""
    def test_probs(fold: Fold, _: Path) -> np.ndarray:
        rng = np.random.default_rng([seed, fold.seed_offset])
        by_id = {info.slide_id: info for info in infos}
        probs = rng.dirichlet(np.ones(3), len(fold.test))
        for row, slide in zip(probs, fold.test):
            if rng.random() < skill:
                row[CLASSES.index(by_id[slide].label)] += 1.0
        return probs / probs.sum(1, keepdims=True)

    cfg = {"out": str(out), "folds": 5, "cv": {"repeats": repeats}, "seed": 0, "imbalance": "none"}
    return run_folds(infos, CLASSES, FoldSettings.from_mapping(cfg), Accelerator(cpu=True), test_probs, {"title": "simulated"})


def test_compare_runs_cli(tmp_path, capsys):
    infos = [SlideInfo(f"s{i:03d}", CLASSES[i % 3], f"p{i}") for i in range(90)]
    weak = simulated_run(tmp_path / "weak", infos, 0.3, seed=1)
    strong = simulated_run(tmp_path / "strong", infos, 0.9, seed=2)
    # run_folds wrote the repeats: per-fold metrics carry what pairing needs, predictions a repeat column
    assert [(f["repeat"], f["fold"]) for f in strong["folds"]] == [(r, k) for r in range(2) for k in range(5)]
    assert strong["repeats"] == 2 and strong["n_folds"] == 5
    rows = list(csv.DictReader(open(tmp_path / "strong" / "predictions.csv")))
    assert len(rows) == 180 and {r["repeat"] for r in rows} == {"0", "1"}
    # reading the run back gives the same per-fold metrics as metrics.json
    run = load_run(tmp_path / "strong")
    saved = json.loads((tmp_path / "strong" / "metrics.json").read_text())["folds"]
    assert [f["balanced_accuracy"] for f in run.fold_metrics()] == pytest.approx(
        [f["balanced_accuracy"] for f in saved], abs=1e-5)
    value, low, high = run.pooled("balanced_accuracy", n_boot=200)
    assert low < value < high and value > 0.8

    main([str(tmp_path / "strong"), str(tmp_path / "weak"), "--bootstrap", "100"])
    printed = capsys.readouterr().out
    assert "| strong - weak | balanced accuracy |" in printed and "| weak |" in printed
    assert "strong beats weak by +0." in printed and "balanced accuracy (95 % CI +0." in printed
    pair = paired_difference("strong", strong["folds"], "weak", weak["folds"])
    assert pair.sentence() in printed and pair.separated

    # other folds (another seed) are refused, naming a slide that moved
    cfg_seed = {"out": str(tmp_path / "other"), "folds": 5, "cv": {"repeats": 2}, "seed": 7, "imbalance": "none"}
    run_folds(infos, CLASSES, FoldSettings.from_mapping(cfg_seed), Accelerator(cpu=True), lambda f, _: np.full((len(f.test), 3), 1 / 3), {})
    with pytest.raises(SplitMismatch, match=r"not run on identical splits: e.g. only .* has slide 's\d+'"):
        main([str(tmp_path / "strong"), str(tmp_path / "other")])
    with pytest.raises(FileNotFoundError, match="not a finished cross-validated run"):
        main([str(tmp_path / "strong"), str(tmp_path)])


def test_repeat_ensemble_averages_each_slides_repeats(tmp_path, capsys):
    infos = [SlideInfo(f"s{i:03d}", CLASSES[i % 3], f"p{i}") for i in range(90)]
    simulated_run(tmp_path / "middling", infos, 0.5, seed=3, repeats=3)
    simulated_run(tmp_path / "weak", infos, 0.2, seed=4, repeats=3)
    run = load_run(tmp_path / "middling")
    ensemble = run.repeat_ensemble()
    assert len(ensemble.slide_id) == 90 and set(ensemble.repeat.tolist()) == {0}
    rows = [r for r in csv.DictReader(open(tmp_path / "middling" / "predictions.csv")) if r["slide_id"] == "s007"]
    expected = np.mean([[float(r[f"prob_{c}"]) for c in CLASSES] for r in rows], axis=0)
    assert len(rows) == 3 and ensemble.probs[list(ensemble.slide_id).index("s007")] == pytest.approx(expected)
    # repeat 0's folds and splits: the ensemble still pairs with another run's
    assert ensemble.splits == frozenset(entry for entry in run.splits if entry[0] == 0)
    assert [f["fold"] for f in ensemble.fold_metrics()] == list(range(5))
    # three models with independent errors, averaged, are right more often than one of them on average
    assert ensemble.pooled("balanced_accuracy", n_boot=10)[0] > run.pooled("balanced_accuracy", n_boot=10)[0] + 0.05

    main([str(tmp_path / "middling"), str(tmp_path / "weak"), "--bootstrap", "50", "--ensemble-repeats"])
    printed = capsys.readouterr().out
    assert "(mean +- sd over 5 folds)" in printed and "| middling - weak | balanced accuracy |" in printed


def test_same_named_runs_are_told_apart_by_their_paths(tmp_path, capsys):
    infos = [SlideInfo(f"s{i:03d}", CLASSES[i % 3], f"p{i}") for i in range(90)]
    simulated_run(tmp_path / "seed0" / "run", infos, 0.9, seed=5)
    simulated_run(tmp_path / "seed1" / "run", infos, 0.3, seed=6)
    assert run_labels([tmp_path / "a" / "x", tmp_path / "b" / "c" / "x", tmp_path / "y"]) == ["a/x", "c/x", "y"]

    main([str(tmp_path / "seed1" / "run"), str(tmp_path / "seed0" / "run"), "--bootstrap", "50"])
    printed = capsys.readouterr().out
    assert "| seed1/run |" in printed and "| seed0/run |" in printed
    assert "| seed1/run - seed0/run | balanced accuracy |" in printed
    assert "seed0/run beats seed1/run by +0." in printed  # the stronger run named, though given second

    with pytest.raises(UserError, match="is given twice"):
        main([str(tmp_path / "seed0" / "run"), str(tmp_path / "seed1" / ".." / "seed0" / "run")])
    with pytest.raises(UserError, match="distinct names"):
        main([str(tmp_path / "seed0" / "run"), str(tmp_path / "seed1" / "run"), "--names", "A", "A"])
