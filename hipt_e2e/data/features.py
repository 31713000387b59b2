"""Tile features made by other tools, one HDF5 file per slide, as token grids, and ours in TRIDENT's layout.

The three layouts, as their writers write them:
- TRIDENT: `features` [N, D] (attribute `encoder`), `coords` [N, 2] int64 level-0 x, y with the attributes
  `patch_size` (px at the target magnification), `patch_size_level0`, `target_magnification`,
  `level0_magnification` and `overlap`; its pixel size is 10 / magnification um/px.
- CLAM (extract_features_fp.py): `features` float32 [N, D], `coords` int32 [N, 2] level-0 x, y, no attributes:
  the tile size, resolutions and encoder come from the command line.
- STAMP: `feats` float16 [N, D], `coords` float [N, 2] in micrometres, file attributes `extractor`, `unit`
  ("um"), `tile_size_um` (`tile_size` before 2.1) and `tile_size_px`.
Tiles are placed on their slide's tile lattice (the phase of its first tile), `grid` x `grid` tiles a region;
a tile off the lattice by more than `snap` of a tile, or two on one place, are refused naming the file.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import h5py
import numpy as np
import torch

from hipt_e2e.data.lineage import TOKEN_GRIDS, Lineage
from hipt_e2e.data.manifest import load_manifest
from hipt_e2e.data.streams import SlideBagStream
from hipt_e2e.errors import InputError
from hipt_e2e.io import atomic_open

FeatureFormat = Literal["trident", "clam", "stamp"]
MAGNIFICATION_UM = 10.0  # um/px x magnification, the convention of TRIDENT (and of scanners' 20x = 0.5 um/px)


@dataclass(frozen=True)
class Fallbacks:
    """What the command line says where a file records nothing; a file that records otherwise is refused."""
    tile_px: int | None = None  # tile side in px at mpp
    mpp: float | None = None  # um/px of the tiles
    slide_mpp: float | None = None  # um/px of level 0
    encoder: str | None = None


@dataclass(frozen=True)
class SlideFeatures:
    """One slide's tiles: features [N, D], level-0 top-left x, y [N, 2] and the level-0 side of a tile."""
    features: np.ndarray
    coords: np.ndarray  # float64, level-0 px
    step: float  # a tile's level-0 side
    tile_px: int  # a tile's side at mpp
    mpp: float
    slide_mpp: float
    encoder: str
    magnification: float | None = None
    tissue: np.ndarray | None = None  # [N] fractions, in files this project wrote

    def geometry(self) -> tuple[str, int, int, float]:
        """What every slide of one set must share: encoder, width, tile px, mpp."""
        return self.encoder, int(self.features.shape[1]), self.tile_px, round(self.mpp, 6)


@dataclass(frozen=True)
class GridRegion:
    """A region of `grid` x `grid` tiles: level-0 x, y and side, the token grid [D, grid, grid], its tissue."""
    x: int
    y: int
    size: int
    grid: np.ndarray
    tissue: np.ndarray


def _attribute(attrs: Mapping[str, Any], name: str) -> Any:
    """An attribute as a Python value; absent, or TRIDENT's 'None' for None: None."""
    value = attrs.get(name)
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        value = value.item()
    return None if value in (None, "None", "") else value


def _same(a: Any, b: Any) -> bool:
    return a == b if isinstance(a, str) or isinstance(b, str) else math.isclose(float(a), float(b), rel_tol=1e-6)


def _setting(path: Path, name: str, recorded: Any, given: Any, flag: str) -> Any:
    """The file's value, else the command line's; refused when absent from both or when they differ."""
    if recorded is None and given is None:
        raise InputError(path, f"records no {name}; give {flag}")
    if recorded is not None and given is not None and not _same(recorded, given):
        raise InputError(path, f"records {name} {recorded}, but {flag} says {given}")
    return recorded if recorded is not None else given


def _magnification_mpp(magnification: Any) -> float | None:
    return MAGNIFICATION_UM / float(magnification) if magnification else None


def _read_trident(f: h5py.File, path: Path, given: Fallbacks) -> SlideFeatures:
    attrs = f["coords"].attrs
    if _attribute(attrs, "overlap"):
        raise InputError(path, f"tiles overlap by {_attribute(attrs, 'overlap')} px; token grids need tiles that "
                               "touch (extract with overlap 0)")
    magnification = _attribute(attrs, "target_magnification")
    mpp = _setting(path, "tile resolution (target_magnification)", _magnification_mpp(magnification), given.mpp, "--mpp")
    slide_mpp = _setting(path, "level-0 resolution (level0_magnification)",
                         _magnification_mpp(_attribute(attrs, "level0_magnification")), given.slide_mpp, "--slide-mpp")
    tile_px = _setting(path, "tile size (patch_size)", _attribute(attrs, "patch_size"), given.tile_px, "--tile-px")
    step = _attribute(attrs, "patch_size_level0") or tile_px * mpp / slide_mpp
    encoder = _setting(path, "encoder", _attribute(f["features"].attrs, "encoder"), given.encoder, "--encoder")
    tissue = f["tissue"][:] if "tissue" in f else None
    return SlideFeatures(f["features"][:], f["coords"][:].astype(np.float64), float(step), int(tile_px), float(mpp),
                         float(slide_mpp), str(encoder), float(magnification) if magnification else None, tissue)


def _read_clam(f: h5py.File, path: Path, given: Fallbacks) -> SlideFeatures:
    tile_px = _setting(path, "tile size", None, given.tile_px, "--tile-px")
    mpp = _setting(path, "tile resolution", None, given.mpp, "--mpp")
    slide_mpp = _setting(path, "level-0 resolution", None, given.slide_mpp, "--slide-mpp")
    encoder = _setting(path, "encoder", None, given.encoder, "--encoder")
    return SlideFeatures(f["features"][:], f["coords"][:].astype(np.float64), tile_px * mpp / slide_mpp,
                         int(tile_px), float(mpp), float(slide_mpp), str(encoder))


def _read_stamp(f: h5py.File, path: Path, given: Fallbacks) -> SlideFeatures:
    attrs = f.attrs
    tile_um = _attribute(attrs, "tile_size_um")
    if tile_um is None and _attribute(attrs, "unit") == "um":
        tile_um = _attribute(attrs, "tile_size")
    if tile_um is None:
        raise InputError(path, "records no tile_size_um (coordinates in micrometres); re-extract it with a STAMP "
                               "of 2.0 or later")
    tile_px = _setting(path, "tile size (tile_size_px)", _attribute(attrs, "tile_size_px"), given.tile_px, "--tile-px")
    mpp = _setting(path, "tile resolution", float(tile_um) / tile_px, given.mpp, "--mpp")
    slide_mpp = given.slide_mpp or mpp  # STAMP keeps no level-0 resolution: without one, level 0 is the tiles'
    encoder = _setting(path, "encoder (extractor)", _attribute(attrs, "extractor"), given.encoder, "--encoder")
    return SlideFeatures(f["feats"][:], f["coords"][:].astype(np.float64) / slide_mpp, float(tile_um) / slide_mpp,
                         int(tile_px), float(mpp), float(slide_mpp), str(encoder))


READERS = {"trident": _read_trident, "clam": _read_clam, "stamp": _read_stamp}


def read_slide_features(path: str | Path, layout: FeatureFormat, given: Fallbacks = Fallbacks()) -> SlideFeatures:
    """One slide's feature file in a tool's layout; InputError naming the file for anything missing or malformed."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            tiles = READERS[layout](f, path, given)
    except (OSError, KeyError) as exc:
        raise InputError(path, f"not a {layout} feature file ({type(exc).__name__}: {exc})") from None
    n = len(tiles.coords)
    if n == 0:
        raise InputError(path, "holds no tiles")
    if tiles.features.ndim != 2 or tiles.coords.shape != (n, 2) or len(tiles.features) != n:
        raise InputError(path, f"features {tiles.features.shape} and coordinates {tiles.coords.shape} do not "
                               "pair up as [N, D] and [N, 2]")
    if tiles.features.dtype.kind != "f" or not np.isfinite(tiles.features).all():
        raise InputError(path, f"features of dtype {tiles.features.dtype} hold NaN, Inf or no numbers")
    return tiles


def place_tiles(tiles: SlideFeatures, grid: int, snap: float, path: str | Path, dtype: str) -> list[GridRegion]:
    """The slide's regions of `grid` x `grid` tiles holding any tile, in raster order; missing tiles are
    background (zero features, tissue 0), as in the grids of embed_tiles."""
    origin = tiles.coords.min(axis=0) % tiles.step  # the lattice's phase: the first tile's
    lattice = (tiles.coords - origin) / tiles.step
    cells = np.rint(lattice).astype(np.int64)
    off = np.abs(lattice - cells).max(axis=1)
    worst = int(off.argmax())
    if off[worst] > snap + 1e-6:
        x, y = tiles.coords[worst]
        raise InputError(path, f"the tile at level-0 ({x:g}, {y:g}) is off the {tiles.step:g} px tile grid of the "
                               f"slide's first tile by {off[worst]:.3g} of a tile (--snap {math.ceil(off[worst] * 100) / 100:g} would move "
                               "it onto the grid)")
    _, first, counts = np.unique(cells, axis=0, return_index=True, return_counts=True)
    if (counts > 1).any():
        x, y = tiles.coords[first[counts.argmax()]]
        raise InputError(path, f"{counts.max()} tiles fall on the tile at level-0 ({x:g}, {y:g}): overlapping tiles "
                               "do not form a token grid")
    regions, inverse = np.unique(cells[:, ::-1] // grid, axis=0, return_inverse=True)  # rows, cols: raster order
    inverse = inverse.reshape(-1)
    grids = np.zeros((len(regions), tiles.features.shape[1], grid, grid), dtype=dtype)
    tissue = np.zeros((len(regions), grid, grid), dtype=np.float32)
    grids[inverse, :, cells[:, 1] % grid, cells[:, 0] % grid] = tiles.features
    tissue[inverse, cells[:, 1] % grid, cells[:, 0] % grid] = 1.0 if tiles.tissue is None else tiles.tissue
    side = grid * tiles.step
    return [GridRegion(int(round(origin[0] + col * side)), int(round(origin[1] + row * side)), int(round(side)),
                       grids[n], tissue[n]) for n, (row, col) in enumerate(regions)]


def trident_attributes(slide_id: str, step: int, tile_px: int, mpp: float, slide_mpp: float) -> dict[str, Any]:
    """The `coords` attributes TRIDENT writes and its slide encoders read (patch_size_level0 above all)."""
    def magnification(um: float) -> float | int:
        value = MAGNIFICATION_UM / um
        return int(round(value)) if math.isclose(value, round(value), rel_tol=1e-6) else value

    return {"patch_size": tile_px, "patch_size_level0": step, "target_magnification": magnification(mpp),
            "level0_magnification": magnification(slide_mpp), "overlap": 0, "name": slide_id}


def write_trident_file(path: str | Path, features: np.ndarray, coords: np.ndarray, tissue: np.ndarray,
                       coords_attributes: Mapping[str, Any], encoder: str) -> None:
    """One slide in TRIDENT's layout (features float32, coords int64), written atomically; `tissue` [N] is ours,
    which TRIDENT ignores and `read_slide_features` reads back, so a round trip keeps the grids' tissue."""
    with atomic_open(path) as handle, h5py.File(handle, "w") as f:
        f.create_dataset("features", data=features.astype(np.float32)).attrs["encoder"] = encoder
        f.create_dataset("coords", data=coords.astype(np.int64)).attrs.update(dict(coords_attributes))
        f.create_dataset("tissue", data=tissue.astype(np.float32))


def tile_bag(grids: torch.Tensor, coords: torch.Tensor, sizes: torch.Tensor, tissue: torch.Tensor,
             min_tissue: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A slide's token grids [M, D, rows, cols] -> every tile's embedding [N, D] and level-0 x, y [N, 2]
    (region by region, raster order within each), without tiles of less tissue than min_tissue (all are
    kept when none would be): the bag of attention-MIL directly over tile embeddings, no region stage."""
    n, dim, rows, cols = grids.shape
    features = grids.permute(0, 2, 3, 1).reshape(-1, dim)
    step = torch.where(sizes > 0, sizes // cols, 0)  # a tile's level-0 side; unknown coordinates stay -1
    row, col = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    x = torch.where(coords[:, :1] >= 0, coords[:, :1] + col.flatten() * step[:, None], -1)
    y = torch.where(coords[:, 1:] >= 0, coords[:, 1:] + row.flatten() * step[:, None], -1)
    tile_coords = torch.stack([x, y], dim=-1).reshape(-1, 2)
    keep = tissue.reshape(-1) >= min_tissue
    if not keep.any():
        keep[:] = True
    return features[keep], tile_coords[keep]


def tile_step(bag: Mapping[str, Any], source: str | Path, needs: str) -> int:
    """A slide's level-0 tile side (its regions' level-0 side / tiles per row): refused unless one and known."""
    sizes = bag["sizes"]
    steps = set((sizes // bag["pixels"].shape[-1]).tolist())
    if len(steps) != 1 or (sizes < 0).any():
        raise InputError(source, f"slide {bag['slide_id']}: regions of level-0 sizes {sorted(set(sizes.tolist()))};"
                                 f" {needs} one known tile size per slide")
    return steps.pop()


def export_trident(source: str | Path, out: str | Path) -> list[Path]:
    """Every slide of a token-grid shard set -> OUT/SLIDE.h5 in TRIDENT's layout (every tile of every region,
    its tissue fraction beside, so `hipt-shards build features` gives the same grids back), for TRIDENT's slide
    encoders and Patho-Bench; returns the files written."""
    manifest = load_manifest(source)
    if "lineage" not in manifest:
        raise InputError(source, "written before lineage was recorded (no tile size or resolution): embed it again")
    lineage = Lineage.from_dict(manifest["lineage"])
    tile_px, mpp = lineage.geometry.tile_px, lineage.geometry.mpp
    if lineage.kind != TOKEN_GRIDS or not (tile_px and mpp):
        raise InputError(source, f"holds {lineage.kind} of {lineage.geometry.describe()}; TRIDENT's layout needs "
                                 "token grids (embed_tiles) of a known tile size and resolution")
    encoder = lineage.tile_encoder.architecture.get("encoder", "unknown") if lineage.tile_encoder else "unknown"
    files = []
    for bag in SlideBagStream(manifest):
        grids, sizes, step = bag["pixels"].float(), bag["sizes"], tile_step(bag, source, "TRIDENT's layout has")
        # the tissue fractions ride along as one more channel, so that they are dropped and kept with their tiles
        tiles, coords = tile_bag(torch.cat([grids, bag["tissue"][:, None]], dim=1), bag["coords"], sizes, bag["tissue"])
        files.append(Path(out) / f"{bag['slide_id']}.h5")
        write_trident_file(files[-1], tiles[:, :-1].numpy(), coords.numpy(), tiles[:, -1].numpy(),
                           trident_attributes(bag["slide_id"], step, tile_px, mpp, tile_px * mpp / step), encoder)
    return files
