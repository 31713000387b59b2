"""The colour-only baseline on the slide-level folds: is a model learning more than stain colour?

48-bin RGB histograms per image -> standardised logistic regression on each fold's train + validation
slides, through slide-level training's own fold loop (the same folds, outputs and report as train_wsi).

    python -m hipt_e2e.training.colour_baseline --images ../shared/data/lymphoma-iicbu2008 --out runs/colour
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from hipt_e2e.config import HelpFormatter, setup_logging
from hipt_e2e.data.discovery import slide_id_of_file
from hipt_e2e.data.slides import SlideInfo
from hipt_e2e.errors import run_main
from hipt_e2e.evaluation.knn import colour_histograms, labelled_image_paths, linear_probe, load_rgb
from hipt_e2e.evaluation.splits import Fold
from hipt_e2e.runtime import make_accelerator
from hipt_e2e.training.folds import fold_settings, run_folds

log = logging.getLogger(__name__)


def colour_baseline(images_root: str | Path, out: str | Path, folds: int = 5, seed: int = 0, repeats: int = 1) -> dict:
    """Images in one folder per class (slide id as in shard building: the name without its suffix) -> report
    in `out` (as train_wsi writes)."""
    paths, classes = labelled_image_paths(images_root)
    infos = [SlideInfo(slide_id_of_file(p), p.parent.name, slide_id_of_file(p)) for p in paths]
    features = colour_histograms([load_rgb(p) for p in paths])
    index = {info.slide_id: n for n, info in enumerate(infos)}
    labels = np.array([classes.index(info.label) for info in infos])

    def test_probs(fold: Fold, _: Path) -> np.ndarray:
        train = [index[s] for s in fold.train + fold.val]
        test = [index[s] for s in fold.test]
        return linear_probe().fit(features[train], labels[train]).predict_proba(features[test])

    cfg = {"out": str(out), "folds": folds, "cv": {"repeats": repeats}, "seed": seed, "imbalance": "none"}
    return run_folds(infos, classes, fold_settings(cfg), make_accelerator(), test_probs,
                     {"title": "colour histograms + logistic regression"}, config=cfg)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--images", type=Path, required=True, help="one folder of images per class")
    parser.add_argument("--out", type=Path, required=True, help="output folder of the cross-validated run")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds")
    parser.add_argument("--repeats", type=int, default=1, help="repeated cross-validation (cv.repeats)")
    args = parser.parse_args(argv)
    setup_logging()
    summary = colour_baseline(args.images, args.out, args.folds, args.seed, args.repeats)["summary"]
    log.info("colour baseline: balanced accuracy %.3f +- %.3f, macro AUC %.3f +- %.3f",
             summary["balanced_accuracy"]["mean"], summary["balanced_accuracy"]["sd"],
             summary["auc_macro"]["mean"], summary["auc_macro"]["sd"])


if __name__ == "__main__":
    sys.exit(run_main(main))
