"""Attention as QuPath objects: a GeoJSON FeatureCollection (RFC 7946) per slide, in level-0 pixels.

A Polygon per scored region ("detection") and per tile of the top regions ("tile"); `classification` names
the attention decile (coloured with inferno, so File > Import objects shows them coloured) and `measurements`
hold attention, rank and the slide's probabilities. Polygons are clipped to the slide (border padding is
not tissue).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps

from hipt_e2e.data.masks import geojson_feature

DECILES = 10


def _box(x0: float, y0: float, x1: float, y1: float, dimensions: tuple[int, int] | None) -> list[list[float]] | None:
    """A closed counter-clockwise ring (RFC 7946's right-hand rule in x right, y down pixels), clipped to the
    slide; None when nothing of it is inside."""
    if dimensions is not None:
        x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, dimensions[0]), min(y1, dimensions[1])
    if x1 <= x0 or y1 <= y0:
        return None
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _deciles(values: np.ndarray) -> np.ndarray:
    """1..10: the decile of each value's rank among `values` (ties share the lower rank)."""
    ranks = np.searchsorted(np.sort(values), values, side="left")
    return 1 + (ranks * DECILES) // max(len(values), 1)


def _classification(prefix: str, decile: int) -> dict[str, Any]:
    red, green, blue, _ = colormaps["inferno"](0.15 + 0.85 * (decile - 1) / (DECILES - 1))
    return {"name": f"{prefix} {decile}", "color": [round(red * 255), round(green * 255), round(blue * 255)]}


def slide_features(coords: np.ndarray, size: int, scores: np.ndarray, tile_attention: np.ndarray,
                   probs: np.ndarray, classes: Sequence[str], top: Sequence[int],
                   dimensions: tuple[int, int] | None = None) -> dict[str, Any]:
    """The FeatureCollection of one slide: its regions (level-0 x, y [M, 2], side `size`) with their
    attention `scores` [M], and the tiles of the regions `top` with their attention [M, rows, cols]."""
    slide = {f"p_{name}": float(p) for name, p in zip(classes, probs)}
    features = []
    for index, ((x, y), score, decile) in enumerate(zip(coords.tolist(), scores.tolist(), _deciles(scores))):
        ring = _box(x, y, x + size, y + size, dimensions)
        if ring is not None:
            features.append(geojson_feature([[ring]], "detection", f"region {index}",
                                            _classification("attention", int(decile)),
                                            {"attention": score, "attention_decile": int(decile), "region": index, **slide}))
    for rank, index in enumerate(top):
        (x, y), grid = coords[index].tolist(), tile_attention[index]
        rows, cols = grid.shape
        side = size / cols
        for (row, col), attention, decile in zip(np.ndindex(rows, cols), grid.ravel().tolist(), _deciles(grid.ravel())):
            ring = _box(x + col * side, y + row * side, x + (col + 1) * side, y + (row + 1) * side, dimensions)
            if ring is not None:
                features.append(geojson_feature([[ring]], "tile", f"region {index} tile {row},{col}",
                                                _classification("tile attention", int(decile)),
                                                {"tile_attention": attention, "region": index, "region_rank": rank + 1,
                                                 "row": row, "col": col}))
    return {"type": "FeatureCollection", "features": features}
