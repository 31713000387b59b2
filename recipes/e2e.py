"""End-to-end fine-tuning of HIPT: raw region pixels streamed from shards -> tile encoder -> ViT4K ->
slide model -> slide label, cross-validated like slide-level training.

    accelerate launch recipes/e2e.py                  # the embedded demo (below)
    accelerate launch recipes/e2e.py --config recipes/configs/e2e.yaml data.shards=SHARDS out=runs/e2e \
        model.weights.tile=runs/vit256/backbone.safetensors model.normalisation=imagenet

With no arguments it runs a complete small demo on the CPU in a few minutes: it generates (or reuses)
a synthetic pseudo-H&E slide set in demo_out/ (SYNTHETIC: a class signal in some regions of a slide,
see hipt_e2e/data/synthetic.py), builds its region shards, fine-tunes the tiny HIPT end to end with
3-fold patient-grouped cross-validation and prints the final metrics and where the report is.

Modes: model.freeze_tile=true (staged tile features on the fly), plus model.freeze_region=true (only the
slide model trains), or neither (end to end). Memory: data.regions_per_slide, memory.* (checkpointing,
chunk sizes), train.mixed_precision=bf16, train.grad_accum, data.min_tile_tissue. Several GPUs:
`accelerate launch --multi_gpu --num_processes N recipes/e2e.py ...` (DDP; train.fsdp=true for FSDP).
A run stopped with train.stop_after or killed continues exactly with resume=true.
Outputs in `out`: config.yaml, splits.csv, predictions.csv, metrics.json, confusion_matrix.png, roc.png,
report.md, and per fold best_model.safetensors, history.json, train_log.jsonl, checkpoint.pt.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from hipt_e2e.config import Settings, bound, section
from hipt_e2e.data.synthetic import make_dataset
from hipt_e2e.errors import run_main
from hipt_e2e.models import model_preset
from hipt_e2e.training.e2e import E2ESettings, e2e_accelerator, train_e2e
from hipt_e2e.training.recipe import recipe_settings
from shards.build import BuildSettings, build


@dataclass(frozen=True)
class Demo(Settings):
    """The `demo` section: the synthetic slide set trained on when data.shards is not set."""

    dir: str = "demo_out"
    slides_per_class: int = bound(24, 1)
    size: int = bound(512, 1)  # slide width and height, px
    region_px: int = bound(128, 1)


@dataclass(frozen=True)
class E2ERecipe(E2ESettings):
    """This recipe's settings: end-to-end training's and the demo's."""

    demo: Demo = section(Demo)


def demo_settings(settings: E2ERecipe) -> E2ERecipe:
    """The settings pointing at the demo's data in demo.dir (its shards; out: demo.dir/e2e unless set)."""
    root = Path(settings.demo.dir)
    return settings.with_changes(**{"data.shards": str(root / "shards"), "out": settings.out or str(root / "e2e")})


def prepare_demo(settings: E2ERecipe, accelerator: Accelerator) -> None:
    """The demo's data, made by the main process and reused when present: synthetic pseudo-H&E slides
    (SYNTHETIC, see hipt_e2e.data.synthetic) -> region shards in demo.dir."""
    demo, root = settings.demo, Path(settings.demo.dir)
    if accelerator.is_main_process:
        slides = make_dataset(root / "slides", demo.slides_per_class, demo.size, demo.region_px)
        build(BuildSettings.from_mapping({"kind": "images", "input": str(slides), "out": str(root / "shards"),
                                          "labels": str(slides / "labels.csv"),
                                          "slide_mpp": 0.5, "mpp": 0.5, "region_px": demo.region_px,
                                          "tile_px": model_preset(settings.model.preset)["tile_px"], "encoding": "png"}))
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> dict | None:
    settings = recipe_settings(E2ERecipe, __doc__, argv, required=())
    demo = settings.data.shards is None
    if demo:
        settings = demo_settings(settings)
    accelerator = e2e_accelerator(settings)  # first: it alone decides how many processes the run has (hipt_e2e.runtime)
    if demo:
        prepare_demo(settings, accelerator)
    metrics = train_e2e(settings, accelerator)
    if metrics is not None and accelerator.is_main_process:
        accuracy, auc = metrics["summary"]["balanced_accuracy"], metrics["summary"]["auc_macro"]
        print(f"balanced accuracy {accuracy['mean']:.3f} +- {accuracy['sd']:.3f}, macro AUC {auc['mean']:.3f} +- "
              f"{auc['sd']:.3f} over {metrics['n_folds']} folds; report: {metrics['report']}")
    return metrics


if __name__ == "__main__":
    sys.exit(run_main(main))
