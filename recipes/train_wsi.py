"""Slide-level training on region-embedding bags (the output of embed_regions.py), cross-validated.

    accelerate launch recipes/train_wsi.py --config recipes/configs/train_wsi.yaml data.shards=DIR out=DIR

model.name: vit_wsi (HIPT's slide transformer) or abmil (attention-MIL baseline). Writes splits.csv,
predictions.csv, metrics.json, confusion_matrix.png, roc.png, report.md and per-fold best models.
"""
import sys

from hipt_e2e.errors import run_main
from hipt_e2e.training.slide_level import SlideSettings, train_from_shards


def main(argv: list[str] | None = None) -> dict:
    return train_from_shards(SlideSettings, __doc__, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
