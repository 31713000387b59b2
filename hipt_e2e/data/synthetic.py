"""A small, deterministic, synthetic pseudo-H&E slide dataset for the demo and the tests (no medical data).

The class signal (nucleus size and density) is in a random subset of each slide's regions only, the rest
alike in every class: the situation attention-based slide models are built for.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from hipt_e2e.config import HelpFormatter, setup_logging
from hipt_e2e.errors import run_main

log = logging.getLogger(__name__)

CLASSES = ("class_a", "class_b")
# (nuclei per 64x64 px, radius) inside signal regions, per class; background regions use the first.
SIGNAL = {"class_a": (6, 3), "class_b": (14, 5)}


def _paint_nuclei(canvas: np.ndarray, rng: np.random.Generator, x0: int, y0: int, size: int,
                  per_64: int, radius: int) -> None:
    count = int(per_64 * (size / 64) ** 2)
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disc = xx ** 2 + yy ** 2 <= radius ** 2
    colour = np.array([90, 50, 140]) + rng.integers(-15, 15, size=(count, 3))
    for n, (cx, cy) in enumerate(zip(rng.integers(x0 + radius, x0 + size - radius, count),
                                     rng.integers(y0 + radius, y0 + size - radius, count))):
        patch = canvas[cy - radius: cy + radius + 1, cx - radius: cx + radius + 1]
        patch[disc] = colour[n]


def synthetic_slide(label: str, seed: int, size: int = 512, region_px: int = 128,
                    signal_fraction: float = 0.35) -> np.ndarray:
    """One pseudo-H&E slide [size, size, 3] uint8; a white margin on the right is glass."""
    rng = np.random.default_rng(seed)
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    stroma = np.array([235, 170, 200]) + rng.normal(0, 8, size=(size, size, 3))
    canvas[:] = np.clip(stroma, 0, 255).astype(np.uint8)
    grid = size // region_px
    signal = rng.random((grid, grid)) < signal_fraction
    signal[rng.integers(grid), rng.integers(grid)] = True  # at least one region carries the class
    for row in range(grid):
        for col in range(grid):
            per_64, radius = SIGNAL[label] if signal[row, col] else SIGNAL[CLASSES[0]]
            _paint_nuclei(canvas, rng, col * region_px, row * region_px, region_px, per_64, radius)
    canvas[:, size - region_px // 2:] = 250  # glass: exercises the tissue filter
    return canvas


def make_dataset(out: str | Path, slides_per_class: int = 8, size: int = 512, region_px: int = 128,
                 seed: int = 0) -> Path:
    """Write PNG slides in one folder per class plus labels.csv (two slides per patient). Reused if present."""
    out = Path(out)
    labels = out / "labels.csv"
    if labels.exists():
        log.info("reusing synthetic dataset in %s", out)
        return out
    rows = []
    for class_index, label in enumerate(CLASSES):
        for n in range(slides_per_class):
            slide_id = f"{label}_{n:03d}"
            path = out / label / f"{slide_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic_slide(label, seed * 100_000 + class_index * 1000 + n, size, region_px)).save(path)
            rows.append({"slide_id": slide_id, "label": label, "patient_id": f"{label}_p{n // 2:03d}"})
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    log.info("wrote %d synthetic slides to %s", len(rows), out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="write the synthetic pseudo-H&E demo dataset", formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder: class folders of PNGs and labels.csv")
    parser.add_argument("--slides-per-class", type=int, default=8, help="slides of each class")
    parser.add_argument("--size", type=int, default=512, help="side of each slide, px")
    parser.add_argument("--region-px", type=int, default=128, help="side of the regions the class patterns fill, px")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patterns")
    args = parser.parse_args(argv)
    setup_logging()
    make_dataset(args.out, args.slides_per_class, args.size, args.region_px, args.seed)


if __name__ == "__main__":
    sys.exit(run_main(main))
