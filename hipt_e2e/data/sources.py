"""Reading pixels from whole-slide files, plain images and `.pt` tensors; shard building and inference both
read slides through `iter_regions`."""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Protocol
from xml.etree import ElementTree

import numpy as np
import torch
from PIL import Image

from hipt_e2e.data.masks import Roi
from hipt_e2e.data.tiling import (
    MAX_INK,
    RegionGeometry,
    footprint_fraction,
    ink_mask,
    measure_tiles,
    pad_region,
    region_origins,
    saturation,
    tissue_threshold,
)
from hipt_e2e.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
SLIDE_SUFFIXES = (".svs", ".ndpi", ".mrxs", ".tif", ".tiff", ".scn", ".svslide", ".bif", ".vms", ".vmu", ".dcm")

# Resolutions a microscope scan can have (micrometres per pixel): 40x is ~0.25, 1.25x thumbnails ~8.
PLAUSIBLE_MPP = (0.05, 20.0)
# Display resolutions image writers put in TIFF/PNG headers when no microscope wrote the file.
DISPLAY_DPI = (72, 96, 150, 300, 600)
MICRONS_PER_UNIT = {"inch": 25_400.0, "cm": 10_000.0, "mm": 1_000.0}
# OME-XML length units (UnitsLength); the default micrometre is written with U+00B5, U+03BC or "um"
MICRONS_PER_OME_UNIT = {"m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "\u00b5m": 1.0, "\u03bcm": 1.0, "um": 1.0,
                        "nm": 1e-3, "pm": 1e-6, "\u00c5": 1e-4, "in": 25_400.0, "thou": 25.4}
MAX_UPSAMPLE = 1.25  # reading finer than the slide's own resolution by more than this needs allow_upsample


def implausible_mpp(mpp: float) -> str | None:
    """Why a recorded resolution cannot be a microscope scan's, or None when it can be one."""
    low, high = PLAUSIBLE_MPP
    reason = "" if low <= mpp <= high else f"outside the {low}-{high} um/px microscopes produce"
    for dpi in DISPLAY_DPI:
        for unit, microns in MICRONS_PER_UNIT.items():
            if abs(microns / dpi - mpp) <= 0.01 * mpp:
                return f"a display resolution ({dpi} px per {unit})" + (f", {reason}" if reason else "")
    return reason or None


@dataclass
class Region:
    """One region at the target geometry, with its level-0 footprint."""

    index: int
    x: int
    y: int
    size: int  # side in level-0 pixels
    rgb: np.ndarray  # [region_px, region_px, 3] uint8
    tissue: np.ndarray  # [rows, cols] tissue fraction per tile (ink excluded; 0 where a tile is dropped)
    threshold: int
    ink: np.ndarray  # [rows, cols] ink fraction per tile
    sharpness: np.ndarray  # [rows, cols] variance of the Laplacian per tile (tiling.tile_sharpness)


class SlideReader(Protocol):
    path: Path
    width: int
    height: int
    mpp: float | None
    mpp_recorded: bool  # mpp comes from the file's metadata (checked for plausibility), not from the user

    def thumbnail(self, max_px: int) -> np.ndarray: ...

    def read(self, x: int, y: int, size: int, out_px: int) -> np.ndarray: ...

    def close(self) -> None: ...


class ImageReader:
    """A single-level image (PNG/JPEG/TIFF) read whole with Pillow."""

    def __init__(self, path: str | Path, mpp: float | None):
        self.path = Path(path)
        try:
            with Image.open(self.path) as image:
                self.image = image.convert("RGB")
        except Exception as exc:  # Pillow raises many types for broken files
            raise InputError(self.path, f"cannot read image ({type(exc).__name__}: {exc})") from exc
        self.width, self.height = self.image.size
        self.mpp, self.mpp_recorded = mpp, False

    def thumbnail(self, max_px: int) -> np.ndarray:
        thumb = self.image.copy()
        thumb.thumbnail((max_px, max_px), Image.Resampling.BILINEAR)
        return np.asarray(thumb)

    def read(self, x: int, y: int, size: int, out_px: int) -> np.ndarray:
        width, height = min(size, self.width - x), min(size, self.height - y)
        crop = self.image.crop((x, y, x + width, y + height))
        if size != out_px:
            scale = out_px / size
            crop = resize(crop, max(1, round(width * scale)), max(1, round(height * scale)))
        return pad_region(np.asarray(crop), out_px, out_px)

    def close(self) -> None:
        self.image.close()


class OpenSlideReader:
    """A pyramidal whole-slide file read through OpenSlide."""

    def __init__(self, path: str | Path, mpp: float | None = None):
        import openslide

        self.path = Path(path)
        try:
            self.slide = openslide.OpenSlide(str(self.path))
        except Exception as exc:
            raise InputError(self.path, f"OpenSlide cannot open it ({type(exc).__name__}: {exc})") from exc
        self.width, self.height = self.slide.dimensions
        recorded = self.slide.properties.get(openslide.PROPERTY_NAME_MPP_X)
        if mpp is None and not recorded:
            recorded = ome_mpp(self.path, self.slide.properties.get("tiff.ImageDescription", ""))
        self.mpp_recorded = mpp is None and bool(recorded)
        self.mpp = mpp if mpp is not None else (float(recorded) if recorded else None)

    def thumbnail(self, max_px: int) -> np.ndarray:
        return np.asarray(self.slide.get_thumbnail((max_px, max_px)).convert("RGB"))

    def read(self, x: int, y: int, size: int, out_px: int) -> np.ndarray:
        # the smallest pyramid level with at least out_px pixels per region: the resize only ever shrinks
        level = self.slide.get_best_level_for_downsample(size / out_px)
        downsample = self.slide.level_downsamples[level]
        side = math.ceil(size / downsample)
        rgba = np.asarray(self.slide.read_region((x, y), level, (side, side)))
        rgb = composite_on_white(rgba)
        if side != out_px:
            rgb = np.asarray(resize(Image.fromarray(rgb), out_px, out_px))
        return rgb

    def close(self) -> None:
        self.slide.close()


def ome_mpp(path: Path, description: str) -> float | None:
    """Micrometres per pixel from an OME-TIFF's OME-XML (its first Pixels' PhysicalSizeX), for OME-TIFFs whose
    TIFF tags carry none; None when there is no OME-XML or size, InputError for a size that is no length."""
    if "<OME" not in description:
        return None
    try:
        pixels = next((e for e in ElementTree.fromstring(description).iter() if e.tag.rpartition("}")[2] == "Pixels"),
                      None)
    except ElementTree.ParseError:
        return None
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    size, unit = pixels.get("PhysicalSizeX"), pixels.get("PhysicalSizeXUnit", "\u00b5m")
    if unit not in MICRONS_PER_OME_UNIT:
        raise InputError(path, f"its OME-XML gives PhysicalSizeX in {unit!r}, not a length unit "
                               f"({', '.join(MICRONS_PER_OME_UNIT)}); pass --slide-mpp to state the resolution")
    try:
        return float(size) * MICRONS_PER_OME_UNIT[unit]
    except ValueError:
        raise InputError(path, f"its OME-XML gives PhysicalSizeX {size!r}, not a number; pass --slide-mpp "
                               "to state the resolution") from None


def resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Area average when shrinking (what a scanner's pyramid level holds), bicubic when enlarging."""
    shrinking = width <= image.width and height <= image.height
    return image.resize((width, height), Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (not premultiplied) -> RGB on a white background; outside-slide pixels become white."""
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    rgb = rgba[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.rint(rgb).astype(np.uint8)


def check_resolution(reader: SlideReader, geometry: RegionGeometry, allow_upsample: bool = False) -> None:
    """InputError when the slide has no usable resolution, or reading it at geometry.mpp would enlarge it by
    more than MAX_UPSAMPLE without allow_upsample."""
    if reader.mpp is None:
        raise InputError(reader.path, "no resolution (microns per pixel) in the slide's metadata; "
                                      "pass --slide-mpp to state it")
    problem = implausible_mpp(reader.mpp) if reader.mpp_recorded else None
    if problem:
        raise InputError(reader.path, f"its metadata gives {reader.mpp:.4g} um/px, {problem}: not a microscope "
                                      "scan's resolution, so treated as missing; pass --slide-mpp to state it")
    factor = reader.mpp / geometry.mpp
    if factor > MAX_UPSAMPLE and not allow_upsample:
        raise InputError(reader.path, f"reading it at {geometry.mpp:g} um/px would enlarge its {reader.mpp:.4g} um/px "
                                      f"{factor:.3g}x (more than {MAX_UPSAMPLE}x); use --mpp {reader.mpp:.4g} or "
                                      "coarser, or --allow-upsample if that is meant")


@dataclass
class SlidePlan:
    """Which regions of a slide are read, decided on its thumbnail: masks, and per region origin (raster order)
    None when kept or why it is dropped ("tissue": too little, "ink": ink made it so, "roi": outside the ROI)."""

    thumbnail: np.ndarray
    tissue: np.ndarray  # bool, thumbnail pixels: stained, not ink, inside the ROI
    ink: np.ndarray  # bool
    roi: np.ndarray | None  # bool, or None: no ROI
    scale: float  # thumbnail px per level-0 px
    threshold: int
    size: int  # region side in level-0 px
    origins: list[tuple[int, int]]
    dropped: list[str | None]
    geometry: RegionGeometry
    max_ink: float
    min_sharpness: float | None

    def regions(self, reader: SlideReader, start: int = 0) -> Iterator[Region]:
        """The kept regions read from the slide with their per-tile fractions; those before `start` are
        counted, not read."""
        index, tile_px = 0, self.geometry.tile_px
        for (x, y), reason in zip(self.origins, self.dropped):
            if reason is not None:
                continue
            if index >= start:
                rgb = reader.read(x, y, self.size, self.geometry.region_px)
                tiles = measure_tiles(rgb, tile_px, self.threshold, self.geometry.mpp, self.max_ink, self.min_sharpness)
                tissue = tiles["tissue"]
                if self.roi is not None:  # tiles mostly outside the ROI are no tissue
                    step = self.size * tile_px // self.geometry.region_px
                    for row, col in np.ndindex(*tissue.shape):
                        if footprint_fraction(self.roi, self.scale, x + col * step, y + row * step, step) < 0.5:
                            tissue[row, col] = 0.0
                yield Region(index, x, y, self.size, rgb, tissue, self.threshold, tiles["ink"], tiles["sharpness"])
            index += 1


def _drop_reason(plan: SlidePlan, stained: np.ndarray, x: int, y: int, min_tissue: float) -> str | None:
    fraction = partial(footprint_fraction, mask_scale=plan.scale, x=x, y=y, size=plan.size)
    ink = fraction(plan.ink)
    if ink > plan.max_ink:
        return "ink"
    if fraction(plan.tissue) >= min_tissue:
        return None
    if fraction(stained | plan.ink) >= min_tissue and fraction(stained & ~plan.ink) < min_tissue:
        return "ink"  # kept by saturation alone, as before ink was told apart
    return "roi" if plan.roi is not None and fraction(stained & ~plan.ink) >= min_tissue else "tissue"


def plan_slide(reader: SlideReader, geometry: RegionGeometry, *, min_tissue: float, threshold: int | None = None,
               max_ink: float = MAX_INK, min_sharpness: float | None = None, roi: Roi | None = None,
               thumbnail_px: int = 2048, allow_upsample: bool = False) -> SlidePlan:
    """Decide on the thumbnail which regions hold tissue fraction >= min_tissue (ink and what lies outside the
    ROI excluded) and ink fraction <= max_ink; tiles are dropped by ink, ROI and min_sharpness when read."""
    check_resolution(reader, geometry, allow_upsample)
    thumb = reader.thumbnail(thumbnail_px)
    sat, ink = saturation(thumb), ink_mask(thumb)
    level_threshold = tissue_threshold(sat[~ink], threshold)
    stained = sat > level_threshold
    scale = thumb.shape[1] / reader.width
    roi_mask = None if roi is None else roi.mask(thumb.shape[:2], scale)
    size = geometry.level0_size(reader.mpp)
    origins = region_origins(reader.width, reader.height, size)
    tissue = stained & ~ink
    plan = SlidePlan(thumb, tissue if roi_mask is None else tissue & roi_mask, ink, roi_mask, scale, level_threshold,
                     size, origins, [], geometry, max_ink, min_sharpness)
    plan.dropped = [_drop_reason(plan, stained, x, y, min_tissue) for x, y in origins]
    return plan


def iter_regions(reader: SlideReader, geometry: RegionGeometry, *, min_tissue: float,
                 threshold: int | None = None, max_ink: float = MAX_INK, min_sharpness: float | None = None,
                 roi: Roi | None = None, thumbnail_px: int = 2048, start: int = 0,
                 allow_upsample: bool = False) -> Iterator[Region]:
    """Regions of one slide that `plan_slide` keeps, raster order; the per-tile fractions are measured on each
    region's pixels. Regions before `start` are counted, not read."""
    yield from plan_slide(reader, geometry, min_tissue=min_tissue, threshold=threshold, max_ink=max_ink,
                          min_sharpness=min_sharpness, roi=roi, thumbnail_px=thumbnail_px,
                          allow_upsample=allow_upsample).regions(reader, start)


def load_pt_pixels(path: str | Path) -> np.ndarray:
    """A `.pt` file holding one tensor [3, H, W] (uint8 0-255 or float 0-1) -> RGB uint8 [H, W, 3]; loaded with
    weights_only=True, so a file that needs arbitrary unpickling is refused, not executed."""
    try:
        tensor = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "Weights only load failed" in str(exc):
            raise InputError(path, "holds pickled Python objects; refused (loaded with weights_only=True, "
                                   "never unpickling arbitrary code)") from exc
        detail = (str(exc) or "empty or truncated file").splitlines()[0][:200]
        raise InputError(path, f"not a readable tensor file ({type(exc).__name__}: {detail})") from exc
    if not isinstance(tensor, torch.Tensor):
        raise InputError(path, f"holds a {type(tensor).__name__}, expected one tensor [3, H, W]")
    if tensor.ndim != 3 or tensor.shape[0] != 3 or min(tensor.shape[1:]) == 0:
        raise InputError(path, f"tensor of shape {tuple(tensor.shape)}, expected [3, H, W]")
    if tensor.dtype == torch.uint8:
        pixels = tensor
    elif tensor.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        tensor = tensor.float()
        if not torch.isfinite(tensor).all():
            raise InputError(path, "tensor contains NaN or Inf")
        low, high = tensor.min().item(), tensor.max().item()
        if low < -1e-3 or high > 1 + 1e-3:
            raise InputError(path, f"float values in [{low:.4g}, {high:.4g}], expected the range 0-1")
        pixels = torch.round(tensor.clamp(0, 1) * 255).to(torch.uint8)
    else:
        raise InputError(path, f"dtype {tensor.dtype}, expected uint8 (0-255) or float (0-1)")
    return pixels.permute(1, 2, 0).contiguous().numpy()


def coords_from_name(path: Path) -> tuple[int | None, int | None]:
    """Level-0 x, y from a file name ending in `_<x>_<y>` (common patch naming), else unknown."""
    match = re.search(r"(\d+)[_-](\d+)$", path.stem)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)
