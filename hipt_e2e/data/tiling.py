"""The one tiling code path (tissue masks, the region grid over a slide, tiles inside a region), so that
coordinates, tile order and tissue fractions mean the same everywhere. Tiles are in raster order (index =
row * cols + col); regions lie on a grid from (0, 0), those crossing the border padded with white.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from einops import rearrange

# Bounds on the per-slide Otsu threshold of HSV saturation (0-255). Glass stays below ~10. Otsu alone
# is right when glass dominates a slide, but on fields that are mostly tissue it splits pale stroma from
# nuclei instead (seen on the lymphoma fields: Otsu 35-115), so it is clipped into this range.
TISSUE_FLOOR = 15
TISSUE_CEILING = 30

# Marker ink, told from stain by Beer-Lambert optical density (OD = -log10(I / 255) per channel). Haematoxylin
# (Ruifrok & Johnston's OD vector 0.65, 0.70, 0.29) and eosin (0.07, 0.99, 0.11) both absorb green at least as
# much as red, so every H&E mixture has OD_red <= OD_green; blue and green marker dyes absorb red most (that is
# why they look blue or green). Measured on 32 lymphoma H&E fields: OD_red - OD_green above 0.14 in 1 pixel in
# 10,000 and never above 0.21, while blue (~30, 60, 130) and green (~60, 140, 100) markers give 0.3-0.4.
INK_RED_EXCESS = 0.25
INK_MIN_OD = 0.3  # red channel below ~128: faint colour casts of glass and stroma are not ink
# Black marker absorbs every channel alike; the densest H&E still passes some blue or red (haematoxylin's blue
# OD is less than half its green), so a dark pixel with almost no colour is ink. On the darkest lymphoma fields
# (FL, near-grey nuclei) at most 0.07% of pixels pass this (1.1% with a bound of 50), too few to move a fraction.
BLACK_MAX = 40  # brightest channel below this (OD > 0.8 in every channel)
BLACK_CHROMA = 25  # and max - min channel below this
# Red marker is not detected: it absorbs green and blue like eosin plus haemoglobin (erythrocytes absorb blue
# at 415 nm), so a red rule would also remove bleeding and vessels, which are tissue.
MAX_INK = 0.5  # default: tiles and regions more than half covered by ink are dropped
# Focus is scored at one resolution, so that a score means the same at any --mpp: the variance of the Laplacian
# of grey levels (Pech-Pacheco et al., 2000), finer regions box-averaged to this first. 1 um/px keeps nuclear
# detail (a lymphocyte nucleus is ~7 um) and averages away JPEG and sensor noise.
SHARPNESS_MPP = 1.0


def channel_range(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brightest and darkest channel of every pixel (int16), channel by channel: numpy's max over a last axis
    of 3 is several times slower."""
    red, green, blue = (rgb[..., c].astype(np.int16) for c in range(3))
    return np.maximum(np.maximum(red, green), blue), np.minimum(np.minimum(red, green), blue)


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (0-255, uint8) of an RGB uint8 image [..., 3]."""
    high, low = channel_range(rgb)
    sat = np.where(high > 0, (high - low) * 255 // np.maximum(high, 1), 0)
    return sat.astype(np.uint8)


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the cut that maximises the between-class variance."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(256)
    weight_low = np.cumsum(hist)
    mean_low_sum = np.cumsum(hist * levels)
    weight_high = total - weight_low
    with np.errstate(divide="ignore", invalid="ignore"):
        mean_low = mean_low_sum / weight_low
        mean_high = (mean_low_sum[-1] - mean_low_sum) / weight_high
        between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return int(np.argmax(np.nan_to_num(between)))


def ink_mask(rgb: np.ndarray) -> np.ndarray:
    """Blue, green and black marker pixels of an RGB uint8 image [..., 3] (bool [...])."""
    red, green = rgb[..., 0].astype(np.int16), rgb[..., 1]
    # the OD rules in transmitted light, no logarithm: OD_red - OD_green > e <=> green > 10^e red
    coloured = (green > 10 ** INK_RED_EXCESS * np.maximum(red, 1)) & (red < 255 * 10 ** -INK_MIN_OD)
    high, low = channel_range(rgb)
    return coloured | ((high < BLACK_MAX) & (high - low < BLACK_CHROMA))


def tissue_threshold(values: np.ndarray, fixed: int | None = None) -> int:
    """Saturation threshold for one slide: `fixed` when given, else Otsu on `values`, the saturation of the
    thumbnail's pixels that are not ink (strokes would pull it), clipped."""
    if fixed is not None:
        return int(fixed)
    return int(np.clip(otsu_threshold(values), TISSUE_FLOOR, TISSUE_CEILING))


def tile_sharpness(region_rgb: np.ndarray, tile_px: int, mpp: float) -> np.ndarray:
    """Variance of the Laplacian of every tile's grey levels at SHARPNESS_MPP (a region read at `mpp`):
    float32 [rows, cols]; blurred and glass tiles score low."""
    factor = max(1, round(SHARPNESS_MPP / mpp))
    while tile_px % factor:  # a whole number of pixels per tile at the coarser resolution
        factor -= 1
    height, width = region_rgb.shape[:2]
    grey = region_rgb.astype(np.float32).mean(axis=-1)
    grey = grey.reshape(height // factor, factor, width // factor, factor).mean(axis=(1, 3))
    padded = np.pad(grey, 1, mode="edge")
    laplacian = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:] - 4 * grey
    side = tile_px // factor
    return laplacian.reshape(height // tile_px, side, width // tile_px, side).var(axis=(1, 3)).astype(np.float32)


def measure_tiles(region_rgb: np.ndarray, tile_px: int, threshold: int, mpp: float, max_ink: float = MAX_INK,
                  min_sharpness: float | None = None) -> dict[str, np.ndarray]:
    """Per tile of a region (float32 [rows, cols], raster order): tissue and ink fractions and sharpness; a tile
    with more than `max_ink` ink or sharpness under `min_sharpness` counts as no tissue, so tile filters drop it."""
    height, width = region_rgb.shape[:2]
    if height % tile_px or width % tile_px:
        raise ValueError(f"region of {height}x{width} px is not a whole number of {tile_px} px tiles")
    rows, cols = height // tile_px, width // tile_px
    ink = ink_mask(region_rgb)  # never tissue
    tissue, ink = (mask.reshape(rows, tile_px, cols, tile_px).mean(axis=(1, 3)).astype(np.float32)
                   for mask in ((saturation(region_rgb) > threshold) & ~ink, ink))
    sharpness = tile_sharpness(region_rgb, tile_px, mpp)
    tissue[ink > max_ink] = 0.0
    if min_sharpness is not None:
        tissue[sharpness < min_sharpness] = 0.0
    return {"tissue": tissue, "ink": ink, "sharpness": sharpness}


def cut_tiles(regions: torch.Tensor, tile_px: int) -> torch.Tensor:
    """Regions [..., C, H, W] -> tiles [..., rows*cols, C, tile_px, tile_px] in raster order (row * cols + col)."""
    if regions.shape[-1] % tile_px or regions.shape[-2] % tile_px:
        raise ValueError(f"regions of {tuple(regions.shape[-2:])} px are not a whole number of {tile_px} px tiles")
    return rearrange(regions, "... c (r h) (q w) -> ... (r q) c h w", h=tile_px, w=tile_px)


@dataclass(frozen=True)
class RegionGeometry:
    """Where regions are cut: `region_px` at `mpp` micrometres per pixel, tiles of `tile_px`."""

    region_px: int = 4096
    tile_px: int = 256
    mpp: float = 0.5

    def __post_init__(self) -> None:
        if self.region_px % self.tile_px:
            raise ValueError(f"region_px={self.region_px} is not a multiple of tile_px={self.tile_px}")

    def level0_size(self, slide_mpp: float) -> int:
        """Side of one region in level-0 pixels of a slide scanned at `slide_mpp`."""
        return max(1, round(self.region_px * self.mpp / slide_mpp))


def region_origins(width: int, height: int, size: int) -> list[tuple[int, int]]:
    """Top-left corners (level 0) of the region grid covering a width x height slide, raster order."""
    cols, rows = math.ceil(width / size), math.ceil(height / size)
    return [(col * size, row * size) for row in range(rows) for col in range(cols)]


def footprint_fraction(mask: np.ndarray, mask_scale: float, x: int, y: int, size: int) -> float:
    """Tissue fraction of a level-0 square (x, y, size) on a mask of `mask_scale` pixels per level-0 pixel; parts
    outside the slide count as background (they are padded with white when read)."""
    x0, y0 = int(x * mask_scale), int(y * mask_scale)
    side = max(1, int(round(size * mask_scale)))
    window = mask[y0: y0 + side, x0: x0 + side]
    return float(window.sum()) / float(side * side)


def pad_region(rgb: np.ndarray, height: int, width: int, fill: int = 255) -> np.ndarray:
    """Pad an [h, w, 3] crop at the bottom/right with background to [height, width, 3]."""
    if rgb.shape[0] == height and rgb.shape[1] == width:
        return rgb
    out = np.full((height, width, 3), fill, dtype=np.uint8)
    out[: rgb.shape[0], : rgb.shape[1]] = rgb[:height, :width]
    return out
