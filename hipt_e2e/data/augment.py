"""Training-time augmentation of uint8 regions, on their device, before normalisation (README: augment.*).

Each whole region takes one of the 8 dihedral poses before tiles are cut, its tissue grid with it. Colour:
HED stain jitter on optical density -ln((x + 1) / 256) (exact back to uint8), then brightness, contrast and
saturation as torchvision's ColorJitter. Every parameter is drawn on the CPU from the caller's seeded
generator, so resumed runs and any number of processes draw the same.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange

from hipt_e2e.config import Settings, bound
from hipt_e2e.data.tiling import cut_tiles
from hipt_e2e.errors import SettingError
from hipt_e2e.ssl import colour


@dataclass(frozen=True)
class AugmentSettings(Settings):
    """The `augment` section of end-to-end training (training regions only)."""

    enabled: bool = False
    flips: bool = True  # random horizontal flip of each region
    rotations: bool = True  # random quarter turns of each region (half turns when not square)
    hed_scale: float = bound(0.05, 0.0, 1.0)  # stain amount factor a ~ U(1 - x, 1 + x) per H, E, D; 0: off
    hed_shift: float = bound(0.05, 0.0, 1.0)  # stain amount offset b ~ U(-x, x), optical-density units; 0: off
    brightness: float = bound(0.1, 0.0, 1.0)  # factor ~ U(1 - x, 1 + x); 0: off
    contrast: float = bound(0.1, 0.0, 1.0)
    saturation: float = bound(0.1, 0.0, 1.0)
    per: Literal["region", "tile"] = "region"  # colour parameters per region or per tile

    @property
    def colour(self) -> bool:
        """Whether any colour jitter is on."""
        return any((self.hed_scale, self.hed_shift, self.brightness, self.contrast, self.saturation))


# Ruifrok & Johnson (2001) stain optical-density vectors (rows: haematoxylin, eosin, DAB), unit length.
RGB_FROM_HED = torch.nn.functional.normalize(torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64), dim=1)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


# ------------------------------------------------------------------------------------------ geometry
def pose(images: torch.Tensor, flip: bool, quarter_turns: int) -> torch.Tensor:
    """[..., H, W] flipped left-right (when flip), then turned counter-clockwise quarter_turns times."""
    if flip:
        images = images.flip(-1)
    return torch.rot90(images, quarter_turns, dims=(-2, -1)) if quarter_turns % 4 else images


def unpose(images: torch.Tensor, flip: bool, quarter_turns: int) -> torch.Tensor:
    """The inverse of pose: what was [..., H, W] in that pose, back in the original orientation."""
    images = torch.rot90(images, -quarter_turns, dims=(-2, -1)) if quarter_turns % 4 else images
    return images.flip(-1) if flip else images


DIHEDRAL = [(flip, turns) for flip in (False, True) for turns in range(4)]  # the 8 poses of a square
TTA = {"none": [(False, 0)], "dihedral": DIHEDRAL}  # test-time augmentation: the poses each region is scored in
Tta = Literal["none", "dihedral"]  # a tta setting: a name in TTA


def tta_poses(name: str) -> list[tuple[bool, int]]:
    if name not in TTA:
        raise SettingError(f"tta must be one of {sorted(TTA)}, got {name!r}")
    return TTA[name]


def random_poses(regions: torch.Tensor, tissue: torch.Tensor | None, augment: AugmentSettings,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each region (and its tissue grid) in a random pose; regions sharing a pose are moved together."""
    n, square = len(regions), regions.shape[-1] == regions.shape[-2]
    flips = torch.rand(n, generator=generator) < 0.5 if augment.flips else torch.zeros(n, dtype=torch.bool)
    steps = 1 if square else 2  # a non-square region turns by half turns only, keeping its shape
    turns = (torch.randint(0, 4 // steps, (n,), generator=generator) * steps if augment.rotations
             else torch.zeros(n, dtype=torch.long))
    if not (flips.any() or (turns % 4).any()):
        return regions, tissue
    regions, tissue = regions.clone(), tissue.clone() if tissue is not None else None
    for flip, turn in {(bool(f), int(t)) for f, t in zip(flips, turns)}:
        rows = ((flips == flip) & (turns == turn)).nonzero().flatten()
        regions[rows.to(regions.device)] = pose(regions[rows.to(regions.device)], flip, turn)
        if tissue is not None:
            tissue[rows] = pose(tissue[rows], flip, turn)
    return regions, tissue


# ------------------------------------------------------------------------------------------ colour
def rgb_to_hed(pixels: torch.Tensor) -> torch.Tensor:
    """0-255 valued RGB [B, 3, H, W] -> stain amounts [B, 3 (H, E, D), H, W] (float64 maths in float32)."""
    density = -torch.log((pixels.float() + 1.0) / 256.0)
    return torch.einsum("bchw,cs->bshw", density, HED_FROM_RGB.to(density))


def hed_to_rgb(stains: torch.Tensor) -> torch.Tensor:
    """Stain amounts [B, 3, H, W] -> 0-255 valued RGB (float, not rounded or clipped)."""
    density = torch.einsum("bshw,sc->bchw", stains, RGB_FROM_HED.to(stains))
    return 256.0 * torch.exp(-density) - 1.0


def _uniform(spread: float, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Factors ~ U(1 - spread, 1 + spread)."""
    return 1.0 + spread * (2.0 * torch.rand(shape, generator=generator) - 1.0)


def jitter_colour(units: torch.Tensor, augment: AugmentSettings, generator: torch.Generator) -> torch.Tensor:
    """uint8 images [B, 3, h, w] (regions or tiles) -> colour-jittered uint8, parameters per image."""
    n = len(units)
    scale = _uniform(augment.hed_scale, (n, 3), generator)
    shift = augment.hed_shift * (2.0 * torch.rand((n, 3), generator=generator) - 1.0)
    spreads = (augment.brightness, augment.contrast, augment.saturation)
    factors = [_uniform(spread, (n,), generator) for spread in spreads]
    images = units.float()
    if augment.hed_scale or augment.hed_shift:
        stains = rgb_to_hed(images)
        stains = stains * scale.to(stains).view(n, 3, 1, 1) + shift.to(stains).view(n, 3, 1, 1)
        images = hed_to_rgb(stains)
    images = (images / 255.0).clamp(0.0, 1.0)
    for spread, op, factor in zip(spreads, (colour.adjust_brightness, colour.adjust_contrast, colour.adjust_saturation),
                                  factors):
        if spread:
            images = op(images, factor)
    return (images * 255.0).round_().to(torch.uint8)


def augment_regions(regions: torch.Tensor, tissue: torch.Tensor | None, augment: AugmentSettings, tile_px: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 regions [M, 3, H, W] of one slide (and their tissue grids [M, rows, cols]) -> augmented copies;
    colour one region at a time, so the float working copy stays one region's size."""
    regions, tissue = random_poses(regions, tissue, augment, generator)
    if not augment.colour:
        return regions, tissue
    rows, cols = regions.shape[-2] // tile_px, regions.shape[-1] // tile_px
    out = torch.empty_like(regions)
    for index, region in enumerate(regions):
        if augment.per == "tile":
            tiles = jitter_colour(cut_tiles(region, tile_px), augment, generator)
            out[index] = rearrange(tiles, "(r q) c h w -> c (r h) (q w)", r=rows, q=cols)
        else:
            out[index] = jitter_colour(region[None], augment, generator)[0]
    return out, tissue
