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


@pytest.fixture(scope="session")
def e2e_slides(tmp_path_factory) -> Path:
    """12 synthetic slides of 256 px (3 patients per class, so 3 folds); the right-hand regions of 128 px
    are half glass, so their tiles' tissue fractions differ."""
    from hipt_e2e.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("e2e") / "slides", slides_per_class=6, size=256, region_px=128)


def _build_shards(slides: Path, out: Path, encoding: str) -> Path:
    from shards.build import build

    build({"kind": "images", "input": str(slides), "labels": str(slides / "labels.csv"), "out": str(out),
           "slide_mpp": 0.5, "region_px": 128, "tile_px": 32, "encoding": encoding, "shard_bytes": 200_000})
    return out


@pytest.fixture(scope="session")
def shards(e2e_slides, tmp_path_factory) -> Path:
    """e2e_slides as PNG shards: 4 regions of 128 px = 4 x 4 tiles of 32 px per slide."""
    return _build_shards(e2e_slides, tmp_path_factory.mktemp("png") / "shards", "png")


@pytest.fixture(scope="session")
def jpeg_shards(e2e_slides, tmp_path_factory) -> Path:
    """The same slides as JPEG q95 shards (the encoding GPU decoding applies to)."""
    return _build_shards(e2e_slides, tmp_path_factory.mktemp("jpeg") / "shards", "jpeg")
