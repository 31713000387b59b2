"""Tissue and quality control on real H&E pixels (a lymphoma field) beside glass, with marker strokes drawn
here by Beer-Lambert (pixel x the ink's transmittance): ink is not tissue, QC files are valid GeoJSON and
PNG, and a QuPath ROI restricts tiling (and the exported mask round-trips as one)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from hipt_e2e.data.streams import TileStream
from hipt_e2e.data.tiling import footprint_fraction, ink_mask, otsu_threshold, region_origins, saturation
from shards.build import BuildSettings, build
from tests.conftest import lymphoma_images, read_rgb
from tests.test_shards import samples_of

# transmittance (R, G, B) of dense marker strokes
INKS = {"blue": (0.10, 0.30, 0.65), "green": (0.20, 0.55, 0.30), "black": (0.10, 0.10, 0.12)}
REGION, TILE = 256, 64


def _stroke(image: np.ndarray, rows: slice, cols: slice, ink: str) -> None:
    image[rows, cols] = np.rint(image[rows, cols] * np.array(INKS[ink])).astype(np.uint8)


@pytest.fixture(scope="module")
def slide(lymphoma_dir, tmp_path_factory) -> Path:
    """1536 x 1024 px at 0.5 um/px: real fields (a mosaic of 12) on the left half, glass with a blue, a green and a black
    stroke (100 px wide) on the right half, a blue stroke across the tissue at y 128-192 (one tile row) and the
    second region row of tissue out of focus (Gaussian blur, sigma 2 px)."""
    rng = np.random.default_rng(0)
    image = np.clip(242 + rng.normal(0, 2, (1024, 1536, 3)), 0, 255).astype(np.uint8)
    fields = [read_rgb(path)[:256, :256] for path in lymphoma_images(lymphoma_dir, 4)]
    image[:, :768] = np.stack(fields).reshape(4, 3, 256, 256, 3).transpose(0, 2, 1, 3, 4).reshape(1024, 768, 3)
    image[256:512, :768] = np.asarray(Image.fromarray(image[256:512, :768]).filter(ImageFilter.GaussianBlur(2)))
    for n, ink in enumerate(INKS):
        _stroke(image, slice(None), slice(768 + n * 256 + 80, 768 + n * 256 + 180), ink)
    _stroke(image, slice(128, 192), slice(0, 768), "blue")
    path = tmp_path_factory.mktemp("ink") / "slides" / "marked.png"
    path.parent.mkdir()
    Image.fromarray(image).save(path)
    return path


def _build(slide: Path, out: Path, **settings) -> list[tuple[np.ndarray, dict]]:
    build(BuildSettings.from_mapping({"kind": "images", "input": str(slide.parent), "out": str(out), "slide_mpp": 0.5,
                                      "region_px": REGION, "tile_px": TILE, "encoding": "png", **settings}))
    return samples_of(out)


def test_ink_rules_on_real_pixels(lymphoma_dir):
    fields = [read_rgb(path)[::2, ::2] for path in lymphoma_images(lymphoma_dir, 3)]
    assert max(ink_mask(field).mean() for field in fields) < 0.01  # H&E is not ink
    for ink in INKS:
        for field in (fields[0].copy(), np.full((64, 64, 3), 242, np.uint8)):  # over tissue and on glass
            _stroke(field, slice(None), slice(None), ink)
            assert ink_mask(field).mean() > 0.95, ink


def test_ink_on_glass_is_not_written(slide, tmp_path):
    thumb = read_rgb(slide)
    # before: saturation above the clipped Otsu threshold was tissue, ink included
    old = saturation(thumb) > np.clip(otsu_threshold(saturation(thumb)), 15, 30)
    before = [(x, y) for x, y in region_origins(1536, 1024, REGION)
              if footprint_fraction(old, 1.0, x, y, REGION) >= 0.25]
    samples = _build(slide, tmp_path)
    assert (len(before), len(samples)) == (24, 12)  # 12 regions were ink on glass
    assert all(record["x"] < 768 for _, record in samples)
    for _, record in samples[:3]:  # region row 0: tile row 2 lies under the blue stroke
        ink, tissue = (np.array(record[key]).reshape(4, 4) for key in ("ink", "tissue"))
        assert (ink[2] > 0.9).all() and (tissue[2] == 0).all()
        assert (ink[[0, 1, 3]] < 0.05).all() and (tissue[[0, 1, 3]] > 0.5).all()
    tiles = [tile["record"] for tile in TileStream(tmp_path)]  # each tile's record holds its own measures
    assert sum(tile["ink"] > 0.9 and tile["tissue_fraction"] == 0 for tile in tiles) == 12
    assert all(isinstance(tile["sharpness"], float) for tile in tiles)
    picture = Image.open(tmp_path / "qc" / "marked.png")
    assert picture.size == (1536, 1024)
    # dropped for ink: filled magenta over the strokes' regions; kept regions are outlined, not filled
    assert np.asarray(picture)[600, 1100, 0] > np.asarray(picture)[600, 1100, 1] + 40


def _check_geojson(collection: dict) -> list:
    assert collection["type"] == "FeatureCollection" and collection["features"]
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["properties"]["objectType"] == "annotation"
        geometry = feature["geometry"]
        assert geometry["type"] == "Polygon"
        for n, ring in enumerate(geometry["coordinates"]):
            assert ring[0] == ring[-1] and len(ring) >= 4
            x, y = np.array(ring).T
            area = np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1])
            assert (area > 0) == (n == 0)  # exterior counter-clockwise, holes clockwise
    return collection["features"]


def test_qupath_roi_limits_tiling_and_the_mask_round_trips(slide, tmp_path):
    kept = [(r["x"], r["y"]) for _, r in _build(slide, tmp_path / "all")]
    mask = json.loads((tmp_path / "all" / "qc" / "marked.geojson").read_text())
    features = _check_geojson(mask)
    assert all(x <= 768 for f in features for ring in f["geometry"]["coordinates"] for x, _ in ring)
    # the exported mask as the ROI: the same regions
    (tmp_path / "roi").mkdir()
    (tmp_path / "roi" / "marked.geojson").write_text(json.dumps(mask))
    assert [(r["x"], r["y"]) for _, r in _build(slide, tmp_path / "same", roi=str(tmp_path / "roi"))] == kept
    # an edited ROI (QuPath's older list export): the top-left 512 px, less an Ignore* square over region (256, 0)
    box = [[0, 0], [512, 0], [512, 512], [0, 512], [0, 0]]
    hole = [[256, 0], [512, 0], [512, 256], [256, 256], [256, 0]]
    (tmp_path / "roi" / "marked.geojson").write_text(json.dumps([
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [box]},
         "properties": {"classification": {"name": "Tumor"}}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [hole]},
         "properties": {"classification": {"name": "Ignore*"}}}]))
    limited = _build(slide, tmp_path / "roi-build", roi=str(tmp_path / "roi"))
    assert [(r["x"], r["y"]) for _, r in limited] == [(0, 0), (0, 256), (256, 256)]


def test_blurred_band_scores_low_and_min_sharpness_drops_it(slide, tmp_path):
    def sharpness(samples: list, blurred: bool) -> np.ndarray:
        return np.array([s for _, r in samples if (r["y"] == 256) == blurred
                         for s, t in zip(r["sharpness"], r["tissue"]) if t >= 0.5])

    samples = _build(slide, tmp_path / "all")
    report = json.loads((tmp_path / "all" / "qc" / "sharpness.json").read_text())
    assert report["tiles"] == len(sharpness(samples, True)) + len(sharpness(samples, False)) > 100
    assert sharpness(samples, True).max() * 10 < sharpness(samples, False).min()
    assert report["quantiles"]["10"] < 1000 < report["quantiles"]["50"]  # the band shows in the distribution
    dropped = _build(slide, tmp_path / "sharp", min_sharpness=1000.0)
    assert len(dropped) == len(samples)  # regions stay; their blurred tiles have tissue 0
    for (_, before), (_, after) in zip(samples, dropped):
        blurred = (np.array(before["sharpness"]) < 1000) & (np.array(before["tissue"]) > 0)
        assert blurred.any() == (before["y"] == 256)
        assert after["tissue"] == [0.0 if b else t for t, b in zip(before["tissue"], blurred)]
