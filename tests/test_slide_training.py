"""Slide-level training: vit_wsi / attention-MIL bags and FC + vote on generated embedding shards."""
from __future__ import annotations

import csv
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hipt_e2e.config import resolve_settings
from hipt_e2e.data.embeddings import SlideBag, read_slide_bags, write_slide_bags
from hipt_e2e.errors import SettingError
from hipt_e2e.evaluation.splits import SplitError
from hipt_e2e.training.slide_level import FCSettings, SlideSettings, class_weights, epoch_order
from tests.launch import launch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "recipes"))
import train_fc  # noqa: E402
import train_wsi  # noqa: E402

CLASSES = ["a", "b", "c"]


def make_bags(n_per_class: int = 10, dim: int = 24, seed: int = 0, split: bool = False,
              dense: bool = False) -> list[SlideBag]:
    """Each slide: 4-12 noise regions, of which 1-3 carry its class's direction (a MIL-style signal), or
    all of them when `dense` (the case a per-region classifier with a vote can learn)."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(CLASSES), dim)) * 4.0
    bags = []
    for c, label in enumerate(CLASSES):
        for n in range(n_per_class):
            m = int(rng.integers(4, 13))
            features = rng.normal(size=(m, dim))
            signal = m if dense else int(rng.integers(1, 4))
            features[rng.choice(m, signal, replace=False)] += directions[c]
            coords = np.stack([np.arange(m) * 256, np.zeros(m)], 1)
            part = (["train"] * 4 + ["val", "test"])[n % 6] if split else None
            bags.append(SlideBag(f"{label}{n:02d}", f"pat_{label}{n // 2}", label,
                                 torch.tensor(features, dtype=torch.float32), torch.tensor(coords, dtype=torch.int64),
                                 part))
    return bags


@pytest.fixture(scope="module")
def bag_shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bags")
    write_slide_bags(out, make_bags(), CLASSES, build_args={"test": True}, dtype="float16")
    return out


def test_bag_shards_round_trip(bag_shards):
    bags, classes = read_slide_bags(bag_shards)
    original = make_bags()
    assert classes == CLASSES and [b.slide_id for b in bags] == [b.slide_id for b in original]
    for got, want in zip(bags, original):
        assert torch.allclose(got.features, want.features, atol=1e-2) and torch.equal(got.coords, want.coords)


def _run(recipe, bag_shards: Path, out: Path, *overrides: str) -> dict:
    return recipe.main(["data.shards=" + str(bag_shards), f"out={out}", "folds=3", "optim.epochs=20",
                        "patience=20", *overrides])


@pytest.mark.parametrize("model", ["vit_wsi", "abmil"])
def test_bag_models_learn_a_separable_task(bag_shards, tmp_path, model):
    metrics = _run(train_wsi, bag_shards, tmp_path, f"model.name={model}", "optim.lr=1e-3")
    assert metrics["summary"]["balanced_accuracy"]["mean"] >= 0.9, metrics["summary"]
    assert metrics["summary"]["auc_macro"]["mean"] >= 0.95
    rows = list(csv.DictReader(open(tmp_path / "predictions.csv")))
    assert Counter(r["slide_id"] for r in rows) == Counter({b.slide_id: 1 for b in make_bags()})
    for name in ("splits.csv", "metrics.json", "report.md", "roc.png", "confusion_matrix.png", "config.yaml",
                 "fold_0/best_model.safetensors", "fold_2/history.json"):
        assert (tmp_path / name).exists(), name


@pytest.mark.parametrize("method", ["majority", "mean"])
def test_fc_with_vote_learns_a_separable_task(tmp_path, method):
    write_slide_bags(tmp_path / "dense", make_bags(dense=True), CLASSES, build_args={})
    metrics = _run(train_fc, tmp_path / "dense", tmp_path / "out", f"vote={method}", "imbalance=weighted_loss", "optim.batch_regions=16")
    assert metrics["summary"]["balanced_accuracy"]["mean"] >= 0.9, metrics["summary"]


def test_class_weights_and_balanced_order():
    labels = [0] * 60 + [1] * 30 + [2] * 10
    assert class_weights(labels, 3).tolist() == pytest.approx([100 / 180, 100 / 90, 100 / 30])
    drawn = Counter()
    for epoch in range(30):
        drawn.update(labels[i] for i in epoch_order(labels, 3, balanced=True, seed=0, epoch=epoch))
    assert all(abs(drawn[c] / 3000 - 1 / 3) < 0.03 for c in range(3)), drawn
    plain = epoch_order(labels, 3, balanced=False, seed=0, epoch=0)
    assert sorted(plain) == list(range(100))
    halves = [epoch_order(labels[:99], 3, balanced=False, seed=0, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    assert len(halves[0]) == len(halves[1]) == 50 and set(halves[0] + halves[1]) == set(range(99))


def test_clear_errors(tmp_path):
    bags = make_bags(n_per_class=2)
    write_slide_bags(tmp_path / "few", bags, CLASSES, build_args={})
    with pytest.raises(SplitError, match="fewer patients than the 3 folds"):
        _run(train_wsi, tmp_path / "few", tmp_path / "o1")
    write_slide_bags(tmp_path / "unknown", make_bags(), CLASSES[:2], build_args={})
    with pytest.raises(SplitError, match=r"label\(s\) \['c'\].*not in the class list \['a', 'b'\]"):
        _run(train_wsi, tmp_path / "unknown", tmp_path / "o2")


@pytest.mark.parametrize("recipe, override, message", [
    (train_wsi, "model.name=transmil", "model.name: choose one of ['vit_wsi', 'abmil', 'fc'], got 'transmil'"),
    (train_fc, "vote=median", "vote: choose one of ['majority', 'mean'], got 'median'"),
    (train_wsi, "data.train_fraction=1.5", "data.train_fraction: must be in [0.0, 1.0], got 1.5"),
    (train_wsi, "optim.epochs=0", "optim.epochs: must be >= 1, got 0"),
    (train_wsi, "imbalance=oversample", "imbalance: choose one of"),
    (train_wsi, "train.log_with=neptune", "train.log_with: choose one of"),
])
def test_a_bad_setting_fails_at_the_start_naming_its_key(tmp_path, recipe, override, message):
    """Refused when the settings are read: before the bags (absent here) are opened or a fold trains."""
    with pytest.raises(SettingError, match=re.escape(message)):
        _run(recipe, tmp_path / "absent", tmp_path / "run", override)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("recipe, kind", [("train_wsi", SlideSettings), ("train_fc", FCSettings)])
def test_the_recipe_configs_resolve(recipe, kind):
    settings = resolve_settings(kind, REPO / "recipes" / "configs" / f"{recipe}.yaml")
    assert settings.out == f"runs/{recipe}" and settings.model.name == ("fc" if recipe == "train_fc" else "vit_wsi")


def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    """DDP over 2 CPU processes (one slide each per step) = 1 process accumulating 2 slides per step."""
    write_slide_bags(tmp_path / "bags", make_bags(n_per_class=6, split=True), CLASSES, build_args={})
    common = [f"data.shards={tmp_path / 'bags'}", "optim.epochs=2", "model.dropout=0.0", "imbalance=none"]
    result = launch("recipes/train_wsi.py", [*common, "optim.accumulate=1", f"out={tmp_path / '2'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    train_wsi.main([*common, "optim.accumulate=2", f"out={tmp_path / '1'}"])
    assert json.loads((tmp_path / "2" / "metrics.json").read_text())["processes"] == 2
    two, one = (load_file(tmp_path / p / "fold_0" / "best_model.safetensors") for p in ("2", "1"))
    assert two.keys() == one.keys()
    # One thread per process there, two here: sums split differently, gradients differ by rounding. Adam
    # normalises each entry's gradient, so entries whose gradient is zero in exact arithmetic (attention_c's
    # bias, the key third of each in_proj_bias: softmax is blind to both) step by up to lr on that rounding
    # alone: they say nothing about the batch and are left out. The rest have gradients far above rounding
    # (seen: within 1e-4 lr after the 12 steps) and are compared to lr / 4 (5e-5); a wrong slide order or
    # loss scale moves them by 5-9 lr.
    blind = {"global_attn_pool.attention_c.bias": torch.ones(1, dtype=torch.bool)}
    for key in one:
        if key.endswith("self_attn.in_proj_bias"):
            blind[key] = torch.arange(len(one[key])) // (len(one[key]) // 3) == 1  # q, k, v: the k third
    for key in one:
        keep = ~blind.get(key, torch.zeros(one[key].shape, dtype=torch.bool))
        torch.testing.assert_close(two[key][keep], one[key][keep], atol=5e-5, rtol=0, msg=key)


def test_weighted_loss_weights_single_slides():
    """One slide per step: the class weight must scale its loss (torch's weighted mean would cancel it)."""
    from hipt_e2e.training.slide_level import WeightedCrossEntropy

    logits, target = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([2])
    weights = class_weights([0, 0, 0, 0, 1, 2], 3)  # class 2 is rare: weight 2
    plain = torch.nn.functional.cross_entropy(logits, target)
    assert WeightedCrossEntropy(weights)(logits, target) == pytest.approx(2.0 * plain.item())
    assert WeightedCrossEntropy()(logits, target) == pytest.approx(plain.item())
