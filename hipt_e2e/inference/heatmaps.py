"""Attention heatmaps: region attention over a slide thumbnail (each cell exactly the area scored, from the
level-0 coordinates the regions were cut at), tile attention in a region."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from hipt_e2e.io import atomic_open  # noqa: E402


def region_score_map(shape: tuple[int, int], scale: float, coords: np.ndarray, size: int,
                     scores: np.ndarray) -> np.ndarray:
    """A float map over a thumbnail of `shape` (h, w): each region's footprint (`size` level-0 px, `scale`
    thumbnail px per level-0 px) holds its score, NaN elsewhere."""
    heat = np.full(shape, np.nan, dtype=np.float32)
    side = max(1, int(round(size * scale)))
    for (x, y), score in zip(coords, scores):
        x0, y0 = int(round(x * scale)), int(round(y * scale))
        heat[y0: y0 + side, x0: x0 + side] = score
    return heat


def _overlay(path: Path, image: np.ndarray, heat: np.ndarray, title: str, label: str, figsize: tuple[float, float],
             alpha: float, fraction: float) -> Path:
    figure, axis = plt.subplots(figsize=figsize)
    axis.imshow(image)
    shown = axis.imshow(np.ma.masked_invalid(heat), cmap="inferno", alpha=alpha, vmin=np.nanmin(heat),
                        vmax=np.nanmax(heat))
    figure.colorbar(shown, ax=axis, fraction=fraction, pad=0.02, label=label)
    axis.set_title(title)
    axis.axis("off")
    with atomic_open(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_region_heatmap(path: Path, thumbnail: np.ndarray, heat: np.ndarray, title: str,
                        label: str = "attention") -> Path:
    figsize = (8, 8 * thumbnail.shape[0] / max(1, thumbnail.shape[1]) + 0.6)
    return _overlay(path, thumbnail, heat, title, label, figsize, alpha=0.55, fraction=0.035)


def plot_tile_heatmap(path: Path, region_rgb: np.ndarray, tile_attention: np.ndarray, title: str) -> Path:
    """Region [H, W, 3] with its tile attention [rows, cols] (mean over heads) upsampled onto the tiles."""
    rows, cols = tile_attention.shape
    heat = np.kron(tile_attention, np.ones((region_rgb.shape[0] // rows, region_rgb.shape[1] // cols)))
    return _overlay(path, region_rgb, heat, title, "tile attention (ViT4K CLS)", (6, 6.4), alpha=0.5, fraction=0.045)


def top_regions(scores: np.ndarray, count: int) -> Sequence[int]:
    return [int(i) for i in np.argsort(-scores)[:count]]
