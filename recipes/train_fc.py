"""The FC alternative: a fully connected classifier on single region embeddings (each region labelled
with its slide's label), slides predicted by a vote over their regions (majority, or mean probability).

    accelerate launch recipes/train_fc.py --config recipes/configs/train_fc.yaml data.shards=DIR out=DIR

Same splits, imbalance settings, model selection and report as train_wsi.py.
"""
import sys

from hipt_e2e.errors import run_main
from hipt_e2e.training.slide_level import SLIDE_DEFAULTS, train_from_shards

FC_DEFAULTS = {**SLIDE_DEFAULTS, "model": {**SLIDE_DEFAULTS["model"], "name": "fc"},
               "optim": {**SLIDE_DEFAULTS["optim"], "lr": 1e-3}}


def main(argv: list[str] | None = None) -> dict:
    return train_from_shards(FC_DEFAULTS, __doc__, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
