"""The linear probe: logistic regression on slide embeddings (recipes/embed_slides.py), its regularisation C
chosen on each fold's validation part from 1e-4 ... 1e2, scored on the test part.

    python recipes/linear_probe.py data.shards=runs/slide_embeddings out=runs/probe

Same folds (folds, seed, cv.repeats, level), outputs and report as train_wsi.py and train_fc.py.
"""
import sys

from hipt_e2e.errors import run_main
from hipt_e2e.training.linear_probe import train_probe_from_shards


def main(argv: list[str] | None = None) -> dict:
    return train_probe_from_shards(__doc__, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
