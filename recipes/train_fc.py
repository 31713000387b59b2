"""The FC alternative: a fully connected classifier on single region embeddings (each region labelled
with its slide's label), slides predicted by a vote over their regions (majority, or mean probability).

    accelerate launch recipes/train_fc.py --config recipes/configs/train_fc.yaml data.shards=DIR out=DIR

Same splits, imbalance settings, model selection and report as train_wsi.py.
"""
import sys

from hipt_e2e.errors import run_main
from hipt_e2e.training.slide_level import FCSettings, train_from_shards


def main(argv: list[str] | None = None) -> dict:
    return train_from_shards(FCSettings, __doc__, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
