"""Predict slides with a trained model and write heatmaps (same as the `hipt-predict` command).

    accelerate launch recipes/predict.py SLIDES... --config recipes/configs/predict.yaml out=runs/predict

Exit code: the number of slides that could not be predicted (each listed in predictions.csv).
"""
import sys

from hipt_e2e.errors import run_main
from hipt_e2e.inference.predict import main

if __name__ == "__main__":
    sys.exit(run_main(main))
