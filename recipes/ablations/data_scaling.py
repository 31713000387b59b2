"""Ablation: can the slide transformer be trained with the data at hand?

Slide transformer (vit_wsi) vs attention-MIL vs FC + majority vote, each trained on 10 %, 25 %, 50 %
and 100 % of every fold's training slides (stratified), same folds and seeds, on region-embedding bags
(embed_regions output). Writes docs/ablations/data_scaling.{md,json,png} and the runs under `out`.

    accelerate launch recipes/ablations/data_scaling.py data.shards=runs/lymphoma/bags out=runs/ablations/data_scaling
"""
import copy
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt

from hipt_e2e.data.embeddings import read_slide_bags
from hipt_e2e.errors import run_main
from hipt_e2e.evaluation.ablation import folds_text, paired_answer, write_ablation
from hipt_e2e.io import atomic_open
from hipt_e2e.training.recipe import recipe_config
from hipt_e2e.training.slide_level import SLIDE_DEFAULTS, cross_validate

DEFAULTS = {**copy.deepcopy(SLIDE_DEFAULTS), "models": ["vit_wsi", "abmil", "fc"],
            "fractions": [0.1, 0.25, 0.5, 1.0], "fc_lr": 1e-3, "docs": "docs/ablations"}


def learning_curves(path: Path, variants: dict, models: list, fractions: list) -> Path:
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
    cfg = recipe_config(DEFAULTS, __doc__, argv, required=("out", "data.shards"))
    bags, classes = read_slide_bags(cfg["data"]["shards"])
    start, variants, run_dirs = time.time(), {}, {}
    for model in cfg["models"]:
        for fraction in cfg["fractions"]:
            run = copy.deepcopy(cfg)
            run["model"]["name"] = model
            run["data"]["train_fraction"] = fraction
            run["optim"]["lr"] = cfg["fc_lr"] if model == "fc" else cfg["optim"]["lr"]
            run["out"] = str(Path(cfg["out"]) / f"{model}_{int(fraction * 100)}")
            variants[f"{model} @ {fraction:.0%}"] = cross_validate(bags, classes, run)
            run_dirs[f"{model} @ {fraction:.0%}"] = run["out"]
    full = {name: metrics for name, metrics in variants.items() if name.endswith("@ 100%")}
    smallest = {name: metrics for name, metrics in variants.items() if name.endswith(f"@ {min(cfg['fractions']):.0%}")}
    answer = (f"With all training slides: {paired_answer(full)} With the smallest share: {paired_answer(smallest)} "
              "Read the learning curves for whether the slide transformer is still improving at 100 %.")
    docs = Path(cfg["docs"])
    docs.mkdir(parents=True, exist_ok=True)
    plot = learning_curves(docs / "data_scaling.png", variants, cfg["models"], cfg["fractions"])
    write_ablation(docs, "data_scaling", "Is there enough data for the slide transformer?",
                   "Can the final slide transformer be trained with the data at hand, compared with attention-MIL "
                   "and FC + majority vote, as the training set shrinks?", variants, classes, answer=answer,
                   runtime_s=time.time() - start, plot=plot, run_dirs=run_dirs,
                   lab_scale="Here a slide is a field of 1-2 regions, so the slide transformer attends over almost "
                             "nothing and acts as an MLP on one or two embeddings; on the lab's slides of hundreds "
                             "of regions it has real sequences to aggregate, where attention-MIL and the "
                             "transformer are expected to separate from FC + majority vote by more, and the "
                             "number of slides (not regions) is what these curves count.",
                   setup=f"{len(bags)} slides from `{cfg['data']['shards']}`, {folds_text(cfg)}, "
                         f"imbalance={cfg['imbalance']}, at most {cfg['optim']['epochs']} epochs with early stopping "
                         f"(patience {cfg['patience']}); "
                         "the test folds are always complete.")
    return variants


if __name__ == "__main__":
    sys.exit(run_main(main))
