"""Shared fixtures: the real lymphoma images (skipped cleanly when absent) and generated data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
LYMPHOMA = REPO.parent / "shared" / "data" / "lymphoma-iicbu2008"


@pytest.fixture(scope="session")
def lymphoma_dir() -> Path:
    if not (LYMPHOMA / "CLL").is_dir():
        pytest.skip(f"real lymphoma images not found at {LYMPHOMA}")
    return LYMPHOMA


def lymphoma_images(root: Path, per_class: int) -> list[Path]:
    return [p for cls in ("CLL", "FL", "MCL")
            for p in sorted((root / cls).glob("*.png"), key=lambda q: int(q.stem))[:per_class]]


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory) -> Path:
    from hipt_e2e.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synthetic"), slides_per_class=4, size=256, region_px=64)
