"""Tissue masks a person can check and correct: the tissue mask as QuPath GeoJSON annotations, a QC picture
per slide, and QuPath annotations read back as a region of interest (ROI) that restricts tiling.

GeoJSON is in level-0 pixels (x right, y down), as QuPath's File > Export/Import objects writes and reads it;
rings are closed, exteriors counter-clockwise and holes clockwise in those coordinates (RFC 7946's order).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import contourpy  # matplotlib's contour tracer, installed with it
import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from hipt_e2e.errors import InputError
from hipt_e2e.io import atomic_write_text

if TYPE_CHECKING:
    from hipt_e2e.data.sources import SlidePlan

log = logging.getLogger(__name__)

TISSUE_CLASS = {"name": "Tissue", "color": [0, 160, 0]}
# QuPath's own class for areas to leave out, and a plain name a lab may use
ROI_EXCLUDE = ("Ignore*", "Exclude")
MIN_RING_PX = 16  # thumbnail px^2: specks of the mask smaller than this are left out of the GeoJSON
# thumbnail px: gaps this narrow between stained pixels are closed in the exported mask, so that it outlines
# tissue areas (what a pathologist edits, and as an ROI keeps every stained pixel) rather than each speck
CLOSE_PX = 5
# QC picture: kept regions outlined, dropped ones filled by reason (regions of glass only are left plain)
QC_COLOURS = {"kept": (0, 170, 0), "tissue": (255, 200, 0), "ink": (220, 0, 220), "roi": (90, 90, 255)}

Ring = list[list[float]]


def geojson_feature(polygons: Sequence[Sequence[Ring]], object_type: str, name: str, classification: dict,
                    measurements: dict | None = None) -> dict[str, Any]:
    """One QuPath object: a Polygon (one polygon) or MultiPolygon of rings (exterior, then holes)."""
    geometry = ({"type": "Polygon", "coordinates": list(polygons[0])} if len(polygons) == 1
                else {"type": "MultiPolygon", "coordinates": [list(p) for p in polygons]})
    properties = {"objectType": object_type, "name": name, "classification": classification,
                  **({} if measurements is None else {"measurements": measurements}), "isLocked": True}
    return {"type": "Feature", "geometry": geometry, "properties": properties}


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))


def _corners(ring: np.ndarray) -> np.ndarray:
    """A closed ring without the points inside straight runs (the traced outline has one per pixel)."""
    step = np.diff(ring, axis=0)
    turns = np.any(step[1:] != step[:-1], axis=1)
    return np.concatenate([ring[:1], ring[1:-1][turns], ring[-1:]])


def mask_polygons(mask: np.ndarray, scale: float) -> list[list[Ring]]:
    """The outlines of a bool mask (thumbnail px; `scale` thumbnail px per level-0 px) as polygons in level-0
    px, each [exterior, holes...]; specks under MIN_RING_PX left out."""
    padded = np.pad(mask.astype(np.float32), 1)  # closes outlines that touch the border
    lines, offsets = contourpy.contour_generator(z=padded, fill_type="OuterOffset").filled(0.5, 1.5)
    polygons = []
    for points, cuts in zip(lines, offsets):
        exterior, *holes = (points[a:b] for a, b in zip(cuts[:-1], cuts[1:]))
        if abs(_signed_area(exterior)) < MIN_RING_PX:
            continue
        rings = [exterior, *(hole for hole in holes if abs(_signed_area(hole)) >= MIN_RING_PX)]
        oriented = [r if (_signed_area(r) > 0) == (n == 0) else r[::-1] for n, r in enumerate(rings)]
        # pixel i covers [i, i + 1) of the thumbnail; the padding shifted it by one
        polygons.append([((_corners(r) - 0.5) / scale).round(1).tolist() for r in oriented])
    return polygons


def tissue_geojson(plan: SlidePlan) -> dict[str, Any]:
    """The tissue areas of a slide (ink and what lies outside the ROI excluded) as QuPath annotations."""
    padded = np.pad(plan.tissue, CLOSE_PX)  # closing erodes from the border otherwise
    areas = ndimage.binary_closing(padded, np.ones((CLOSE_PX, CLOSE_PX)))[CLOSE_PX:-CLOSE_PX, CLOSE_PX:-CLOSE_PX]
    features = [geojson_feature([polygon], "annotation", f"tissue {n}", TISSUE_CLASS)
                for n, polygon in enumerate(mask_polygons(areas, plan.scale))]
    return {"type": "FeatureCollection", "features": features}


def qc_picture(plan: SlidePlan) -> Image.Image:
    """The thumbnail with ink tinted, kept regions outlined and dropped regions with tissue or ink filled by
    reason (QC_COLOURS)."""
    image = Image.fromarray(plan.thumbnail).convert("RGBA")
    overlay = Image.new("RGBA", image.size)
    draw = ImageDraw.Draw(overlay)
    ink = np.zeros((*plan.ink.shape, 4), np.uint8)
    ink[plan.ink] = (*QC_COLOURS["ink"], 160)
    overlay.paste(Image.fromarray(ink), (0, 0))
    side = plan.size * plan.scale
    for (x, y), reason in zip(plan.origins, plan.dropped):
        box = (x * plan.scale, y * plan.scale, x * plan.scale + side - 1, y * plan.scale + side - 1)
        window = np.s_[int(box[1]): int(box[3]) + 1, int(box[0]): int(box[2]) + 1]
        if reason is None:
            draw.rectangle(box, outline=(*QC_COLOURS["kept"], 255), width=2)
        elif plan.tissue[window].any() or plan.ink[window].any() or reason == "roi":
            draw.rectangle(box, fill=(*QC_COLOURS[reason], 90), outline=(*QC_COLOURS[reason], 255))
    return Image.alpha_composite(image, overlay).convert("RGB")


def write_qc(plan: SlidePlan, folder: Path, slide_id: str) -> None:
    """<slide_id>.png (the QC picture) and <slide_id>.geojson (the tissue mask) in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    qc_picture(plan).save(folder / f"{slide_id}.png", compress_level=1)  # a third of the default's time, 6% larger
    atomic_write_text(folder / f"{slide_id}.geojson", json.dumps(tissue_geojson(plan)))


@dataclass(frozen=True)
class Roi:
    """A slide's region of interest: polygons (level-0 px) to include (none: the whole slide) and to exclude."""

    include: list[list[Ring]]
    exclude: list[list[Ring]]

    def mask(self, shape: tuple[int, int], scale: float) -> np.ndarray:
        """The ROI on a grid of `shape` (rows, cols) at `scale` grid px per level-0 px, bool."""
        canvas = Image.new("1", (shape[1], shape[0]), 0 if self.include else 1)
        draw = ImageDraw.Draw(canvas)
        for polygons, value in ((self.include, 1), (self.exclude, 0)):
            for exterior, *holes in polygons:
                for ring, fill in ((exterior, value), *((hole, 1 - value) for hole in holes)):
                    draw.polygon([(x * scale, y * scale) for x, y in ring], fill=fill)  # exact to a grid px
        return np.asarray(canvas, dtype=bool)


def read_roi(path: Path, exclude: Sequence[str] = ROI_EXCLUDE) -> Roi:
    """QuPath annotations (a FeatureCollection, one Feature or a list of them, as QuPath versions export) as an
    ROI: Polygons and MultiPolygons whose classification is in `exclude` are cut out, all others included."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable GeoJSON file ({type(exc).__name__}: {exc})") from exc
    features = data.get("features") if isinstance(data, dict) and data.get("type") == "FeatureCollection" else data
    features = [features] if isinstance(features, dict) else features
    if not isinstance(features, list):
        raise InputError(path, "holds no GeoJSON FeatureCollection, Feature or list of Features")
    roi = Roi([], [])
    for feature in features:
        geometry = (feature or {}).get("geometry") or {}
        kind = geometry.get("type")
        if kind not in ("Polygon", "MultiPolygon"):
            continue  # points and lines (cell detections, rulers) enclose no area
        name = ((feature.get("properties") or {}).get("classification") or {}).get("name")
        polygons = [geometry["coordinates"]] if kind == "Polygon" else geometry["coordinates"]
        (roi.exclude if name in exclude else roi.include).extend(polygons)
    return roi


def slide_roi(folder: Path, slide_id: str, exclude: Sequence[str] = ROI_EXCLUDE) -> Roi | None:
    """The ROI of a slide from `folder`/<slide_id>.geojson; None (the whole slide) when there is no such file."""
    if not Path(folder).is_dir():
        raise InputError(folder, "no such folder of ROI annotations")
    path = Path(folder) / f"{slide_id}.geojson"
    if not path.is_file():
        log.warning("no ROI for %s (%s not found): the whole slide is tiled", slide_id, path)
        return None
    return read_roi(path, exclude)
