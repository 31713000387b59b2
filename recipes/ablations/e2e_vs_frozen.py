"""Ablation: does end-to-end fine-tuning beat training only the head?

Three variants of the end-to-end engine (hipt_e2e.training.e2e) from the same start (model.weights.*;
the same seeded random init without them) on the same folds, seeds and sampled regions:
frozen (tile encoder and ViT4K frozen: only the slide model trains, the staged path computed on the
fly), partial (tile encoder frozen: ViT4K and slide model train) and end to end (nothing frozen).
budget=steps (default): the same budget in optimizer steps, every variant trains all train.epochs epochs
over the same slides (early stopping is switched off by patience = train.epochs); budget=converged: each
variant trains until its validation balanced accuracy has not improved for `patience` epochs (at most
train.epochs). train.stop_after is refused either way, and, as in every slide-level run, the epoch with
the best validation balanced accuracy is the one tested.
Writes docs/ablations/e2e_vs_frozen.{md,json,png}; each variant's run is in out/<variant>.

    accelerate launch recipes/ablations/e2e_vs_frozen.py --config recipes/configs/e2e.yaml data.shards=SHARDS \
        model.weights.tile=runs/vit256/backbone.safetensors out=runs/ablations/e2e_vs_frozen
"""
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from accelerate import PartialState

from hipt_e2e.config import Settings, section
from hipt_e2e.data.manifest import load_manifest
from hipt_e2e.errors import SettingError, run_main
from hipt_e2e.evaluation.ablation import folds_text, paired_answer, write_ablation
from hipt_e2e.lineage import read_lineage
from hipt_e2e.training.e2e import E2ESettings, train_e2e
from hipt_e2e.training.recipe import recipe_settings


@dataclass(frozen=True)
class Frozen(Settings):
    """One variant: the stages it freezes (model.freeze_tile, model.freeze_region)."""

    freeze_tile: bool = False
    freeze_region: bool = False


@dataclass(frozen=True)
class Variants(Settings):
    """The `variants` section."""

    frozen: Frozen = field(default_factory=lambda: Frozen(freeze_tile=True, freeze_region=True))
    partial: Frozen = field(default_factory=lambda: Frozen(freeze_tile=True))
    end_to_end: Frozen = section(Frozen)


@dataclass(frozen=True)
class E2EVsFrozen(E2ESettings):
    """This ablation's settings: end-to-end training's, the variants and where the write-up goes."""

    docs: str = "docs/ablations"
    budget: Literal["steps", "converged"] = "steps"
    variants: Variants = section(Variants)


def main(argv: list[str] | None = None) -> dict:
    settings = recipe_settings(E2EVsFrozen, __doc__, argv, required=("out", "data.shards"))
    if settings.train.stop_after is not None:
        raise SettingError("train.stop_after would end a variant early; the variants must share the step budget")
    start, variants = time.time(), {}
    freezes = settings.variants.to_mapping()
    for name, freeze in freezes.items():
        changes = {f"model.{key}": on for key, on in freeze.items()}
        if settings.budget == "steps":
            changes["patience"] = settings.train.epochs  # no early stop: every variant takes every step
        variants[name] = train_e2e(settings.with_changes(**changes, out=str(Path(settings.out) / name)))
    if not PartialState().is_main_process:
        return variants
    manifest = load_manifest(settings.data.shards)
    geometry = read_lineage(manifest).geometry
    train, weights, steps = settings.train, settings.model.weights.to_mapping(), settings.budget == "steps"
    start_from = ", ".join(f"{stage} {path}" for stage, path in weights.items() if path) or "random init (seeded)"
    write_ablation(settings.docs, "e2e_vs_frozen", "End-to-end fine-tuning vs a frozen encoder",
                   "Does end-to-end fine-tuning beat training only the head, from the same pretrained start and "
                   + ("with the same budget in steps?" if steps else
                      "each trained until its validation stops improving?"), variants, manifest["classes"], answer=paired_answer(variants),
                   runtime_s=time.time() - start, run_dirs={name: Path(settings.out) / name for name in variants},
                   lab_scale="A slide of hundreds of 4096 px regions does not fit one backward pass: end to end then "
                             "trains on data.regions_per_slide sampled regions per step (chunk and block "
                             "checkpointing bound the memory; docs/benchmarks.md gives memory and time per region), "
                             "while the frozen variants can read every region's precomputed embedding, so each "
                             "step of end to end sees less of a slide at several times the cost. Fields of 1-2 "
                             "regions, all used in every step, are the case most favourable to end to end.",
                   setup=f"{len(manifest['slides'])} slides from `{settings.data.shards}` "
                         f"({geometry.region_px} px regions of {geometry.tile_px} "
                         f"px tiles); start: {start_from}; model preset {settings.model.preset}; "
                         f"{folds_text(settings.folds, settings.cv.repeats, settings.seed)}, imbalance {settings.imbalance}; "
                         + (f"every variant trains {train.epochs} epochs without early stopping, " if steps else
                            f"each variant trains until validation balanced accuracy has not improved for "
                            f"{settings.patience} epochs (at most {train.epochs}), ")
                         + f"{settings.data.regions_per_slide} regions per slide per step, {train.grad_accum} "
                         f"slides per optimizer step, learning rates {settings.optim.lr.to_mapping()}; frozen stages "
                         "per variant: "
                         + "; ".join(f"{name}: " + (", ".join(key.removeprefix("freeze_") for key, on in freeze.items()
                                                              if on) or "nothing")
                                     for name, freeze in freezes.items()) + ".")
    return variants


if __name__ == "__main__":
    sys.exit(run_main(main))
