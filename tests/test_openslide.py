"""Whole-slide input through OpenSlide: a pyramidal tiled TIFF written from real images in the test."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image

from hipt_e2e.data.sources import composite_on_white
from shards.build import BuildError, BuildSettings, build
from tests.conftest import lymphoma_images, read_rgb
from tests.test_shards import samples_of


def write_pyramid(path: Path, level0: np.ndarray, mpp: float | None, levels: int = 3) -> None:
    """A generic tiled pyramidal TIFF (one page per level, each half the size), as OpenSlide reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path) as tif:
        image = Image.fromarray(level0)
        for level in range(levels):
            scaled = image.reduce(2 ** level) if level else image
            resolution = {} if mpp is None else {"resolution": (1e4 / (mpp * 2 ** level),) * 2,
                                                 "resolutionunit": "CENTIMETER"}
            tif.write(np.asarray(scaled), tile=(128, 128), photometric="rgb", compression="zlib",
                      subfiletype=1 if level else 0, **resolution)


@pytest.fixture(scope="module")
def slides_dir(lymphoma_dir, tmp_path_factory) -> Path:
    """Two 1024 x 768 'slides', each a mosaic of real lymphoma fields, with and without mpp metadata."""
    root = tmp_path_factory.mktemp("wsi")
    fields = [read_rgb(p)[:256, :256] for p in lymphoma_images(lymphoma_dir, 4)]
    mosaic = np.stack(fields).reshape(3, 4, 256, 256, 3).transpose(0, 2, 1, 3, 4).reshape(768, 1024, 3)
    write_pyramid(root / "with_mpp" / "slide_a.tiff", mosaic, mpp=0.5)
    write_pyramid(root / "without_mpp" / "slide_b.tiff", mosaic[::-1].copy(), mpp=None)
    return root


def test_openslide_reads_the_pyramid(slides_dir):
    slide = openslide.OpenSlide(str(slides_dir / "with_mpp" / "slide_a.tiff"))
    assert slide.level_count == 3 and slide.dimensions == (1024, 768)
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)


@pytest.mark.parametrize("mpp,level", [(0.5, 0), (1.0, 1)])
def test_regions_match_read_region(slides_dir, tmp_path, mpp, level):
    """At 0.5 um/px regions come from level 0; at 1.0 um/px from level 1 without resizing."""
    manifest = build(BuildSettings.from_mapping({"kind": "slides", "input": str(slides_dir / "with_mpp"), "out": str(tmp_path),
                                                 "region_px": 256, "tile_px": 64, "mpp": mpp, "min_tissue": 0.0, "encoding": "png"}))
    slide = openslide.OpenSlide(str(slides_dir / "with_mpp" / "slide_a.tiff"))
    samples = samples_of(tmp_path)
    side = 256 * 2 ** level
    expected_origins = [(x, y) for y in range(0, 768, side) for x in range(0, 1024, side)]
    assert [(r["x"], r["y"]) for _, r in samples] == expected_origins
    assert manifest["slides"]["slide_a"]["regions"] == len(expected_origins)
    for rgb, record in samples:
        assert record["size"] == side and record["slide_mpp"] == pytest.approx(0.5)
        reference = composite_on_white(np.asarray(slide.read_region((record["x"], record["y"]), level, (256, 256))))
        np.testing.assert_array_equal(rgb, reference)


def test_slide_without_mpp_fails_clearly_unless_given(slides_dir, tmp_path):
    args = {"kind": "slides", "input": str(slides_dir / "without_mpp"), "region_px": 256, "tile_px": 64,
            "min_tissue": 0.0}
    with pytest.raises(BuildError, match=r"slide_b\.tiff: no resolution .* pass --slide-mpp"):
        build(BuildSettings.from_mapping({**args, "out": str(tmp_path / "a")}))
    manifest = build(BuildSettings.from_mapping({**args, "out": str(tmp_path / "b"), "slide_mpp": 0.5}))
    assert manifest["written"] == 1 and manifest["samples"] == 12
    record = json.loads(json.dumps(samples_of(tmp_path / "b")[0][1]))
    assert record["slide_mpp"] == 0.5 and record["mpp"] == 0.5
