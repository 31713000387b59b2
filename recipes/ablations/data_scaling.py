"""Ablation: can the slide transformer be trained with the data at hand?

Slide transformer (vit_wsi) vs attention-MIL vs FC + majority vote, each trained on 10 %, 25 %, 50 %
and 100 % of every fold's training slides (stratified), same folds and seeds, on region-embedding bags
(embed_regions output). Writes docs/ablations/data_scaling.{md,json,png} and the runs under `out`.

    accelerate launch recipes/ablations/data_scaling.py data.shards=runs/lymphoma/bags out=runs/ablations/data_scaling
"""
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt

from hipt_e2e.data.embeddings import read_slide_bags
from hipt_e2e.errors import run_main
from hipt_e2e.evaluation.ablation import folds_text, paired_answer, write_ablation
from hipt_e2e.io import atomic_open
from hipt_e2e.models.mil import SlideModelName
from hipt_e2e.training.recipe import recipe_settings
from hipt_e2e.training.slide_level import SlideSettings, cross_validate


@dataclass(frozen=True)
class DataScaling(SlideSettings):
    """This ablation's settings: slide-level training's, the models and training shares compared (every model
    at every share) and where the write-up goes."""

    models: tuple[SlideModelName, ...] = ("vit_wsi", "abmil", "fc")
    fractions: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0)  # shares of each fold's training slides (data.train_fraction)
    fc_lr: float = 1e-3  # the fc's optim.lr (the others keep optim.lr)
    docs: str = "docs/ablations"


def learning_curves(path: Path, variants: dict, models: Sequence[str], fractions: Sequence[float]) -> Path:
    figure, axis = plt.subplots(figsize=(6, 4))
    for model in models:
        stats = [variants[f"{model} @ {f:.0%}"]["summary"]["balanced_accuracy"] for f in fractions]
        axis.errorbar([100 * f for f in fractions], [s["mean"] for s in stats], yerr=[s["sd"] for s in stats],
                      marker="o", capsize=3, label=model)
    axis.set_xscale("log")
    axis.set_xticks([100 * f for f in fractions], [f"{f:.0%}" for f in fractions])
    axis.set_xlabel("share of each fold's training slides")
    axis.set_ylabel("test balanced accuracy (mean +- sd over folds)")
    axis.legend()
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def main(argv=None) -> dict:
    cfg = recipe_settings(DataScaling, __doc__, argv, required=("out", "data.shards"))
    bags, classes = read_slide_bags(cfg.data.shards)
    start, variants, run_dirs = time.time(), {}, {}
    for model in cfg.models:
        for fraction in cfg.fractions:
            run = cfg.with_changes(**{"model.name": model, "data.train_fraction": fraction,
                                      "optim.lr": cfg.fc_lr if model == "fc" else cfg.optim.lr,
                                      "out": str(Path(cfg.out) / f"{model}_{int(fraction * 100)}")})
            variants[f"{model} @ {fraction:.0%}"] = cross_validate(bags, classes, run)
            run_dirs[f"{model} @ {fraction:.0%}"] = run.out
    full = {name: metrics for name, metrics in variants.items() if name.endswith("@ 100%")}
    smallest = {name: metrics for name, metrics in variants.items() if name.endswith(f"@ {min(cfg.fractions):.0%}")}
    answer = (f"With all training slides: {paired_answer(full)} With the smallest share: {paired_answer(smallest)} "
              "Read the learning curves for whether the slide transformer is still improving at 100 %.")
    docs = Path(cfg.docs)
    docs.mkdir(parents=True, exist_ok=True)
    plot = learning_curves(docs / "data_scaling.png", variants, cfg.models, cfg.fractions)
    write_ablation(docs, "data_scaling", "Is there enough data for the slide transformer?",
                   "Can the final slide transformer be trained with the data at hand, compared with attention-MIL "
                   "and FC + majority vote, as the training set shrinks?", variants, classes, answer=answer,
                   runtime_s=time.time() - start, plot=plot, run_dirs=run_dirs,
                   lab_scale="Here a slide is a field of 1-2 regions, so the slide transformer attends over almost "
                             "nothing and acts as an MLP on one or two embeddings; on the lab's slides of hundreds "
                             "of regions it has real sequences to aggregate, where attention-MIL and the "
                             "transformer are expected to separate from FC + majority vote by more, and the "
                             "number of slides (not regions) is what these curves count.",
                   setup=f"{len(bags)} slides from `{cfg.data.shards}`, {folds_text(cfg.folds, cfg.cv.repeats, cfg.seed)}, "
                         f"imbalance={cfg.imbalance}, at most {cfg.optim.epochs} epochs with early stopping "
                         f"(patience {cfg.patience}); "
                         "the test folds are always complete.")
    return variants


if __name__ == "__main__":
    sys.exit(run_main(main))
