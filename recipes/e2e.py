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
from accelerate import PartialState

from hipt_e2e.training import recipe_config
from hipt_e2e.training.e2e import E2E_DEFAULTS, train_e2e


def main(argv: list[str] | None = None) -> dict | None:
    cfg = recipe_config(E2E_DEFAULTS, __doc__, argv, required=())
    metrics = train_e2e(cfg)
    if metrics is not None and PartialState().is_main_process:
        accuracy, auc = metrics["summary"]["balanced_accuracy"], metrics["summary"]["auc_macro"]
        print(f"balanced accuracy {accuracy['mean']:.3f} +- {accuracy['sd']:.3f}, macro AUC {auc['mean']:.3f} +- "
              f"{auc['sd']:.3f} over {metrics['n_folds']} folds; report: {metrics['report']}")
    return metrics


if __name__ == "__main__":
    main()
