"""DINO multi-crop augmentations on whole batches, every random parameter drawn per sample on the CPU (from an
optional CPU ``torch.Generator``, so a seed gives the same crops on any device), the pixel work on the input's."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from hipt_e2e.errors import SettingError
from hipt_e2e.normalise import NORMALISATIONS, normalise
from hipt_e2e.ssl import colour

RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)  # aspect ratios of RandomResizedCrop
CROP_ATTEMPTS = 10  # RandomResizedCrop's tries before it falls back to the whole image
JITTER = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
JITTER_OPS = (colour.adjust_brightness, colour.adjust_contrast, colour.adjust_saturation, colour.adjust_hue)
JITTER_P = 0.8
GRAYSCALE_P = 0.2
FLIP_P = 0.5
BLUR_SIGMA = (0.1, 2.0)  # in pixels of DINO's crops: 224 px global, 96 px local
GLOBAL_REFERENCE, LOCAL_REFERENCE = 224, 96


def _uniform(low: float, high: float, shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)


def _chance(p: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator) < p


def _randint_below(high: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One integer in [0, high) per entry of ``high``."""
    return (torch.rand(high.shape, generator=generator, dtype=torch.float64) * high).floor().long()


def _apply_where(images: torch.Tensor, mask: torch.Tensor, op: Callable[..., torch.Tensor],
                 *per_sample: torch.Tensor) -> torch.Tensor:
    """``op(images, *per_sample)`` on the samples the CPU ``mask`` selects only (the others cost nothing)."""
    if not mask.any():
        return images
    rows = mask.nonzero().flatten().to(images.device)
    return images.index_copy(0, rows, op(images[rows], *(values[mask] for values in per_sample)))


@dataclass(frozen=True)
class CropBoxes:
    """Integer pixel boxes, one per sample: rows top..top+height, columns left..left+width."""
    top: torch.Tensor
    left: torch.Tensor
    height: torch.Tensor
    width: torch.Tensor


def sample_resized_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float],
                              generator: torch.Generator | None = None) -> CropBoxes:
    """RandomResizedCrop's box sampling, vectorised: the first of 10 tries (area fraction in ``scale``,
    log-uniform aspect ratio in [3/4, 4/3]) that fits, else the whole image."""
    shape = (n, CROP_ATTEMPTS)
    area = height * width * _uniform(scale[0], scale[1], shape, generator)
    ratio = torch.exp(_uniform(math.log(RATIO_RANGE[0]), math.log(RATIO_RANGE[1]), shape, generator))
    box_w = torch.sqrt(area * ratio).round().long()
    box_h = torch.sqrt(area / ratio).round().long()
    fits = (box_w >= 1) & (box_w <= width) & (box_h >= 1) & (box_h <= height)
    first_fit = fits.int().argmax(dim=1, keepdim=True)  # argmax returns the first of equal maxima
    any_fit = fits.any(dim=1)
    box_w = torch.where(any_fit, box_w.gather(1, first_fit).squeeze(1), width)
    box_h = torch.where(any_fit, box_h.gather(1, first_fit).squeeze(1), height)
    top = _randint_below(height - box_h + 1, generator)
    left = _randint_below(width - box_w + 1, generator)
    return CropBoxes(top, left, box_h, box_w)


def resized_crop(images: torch.Tensor, boxes: CropBoxes, size: int, flip: torch.Tensor) -> torch.Tensor:
    """Crop each sample's box, mirror it where ``flip`` is set, resize it to size x size (bicubic), in one
    ``grid_sample`` over the batch: the positions of crop-then-``interpolate(align_corners=False)``, taps past
    a box edge reading the real neighbouring pixels, no antialiasing (tiles shrink by at most 256/224).
    """
    batch, _, height, width = images.shape
    # Affine map from output coordinates to input coordinates, both normalised to [-1, 1].
    theta = torch.zeros(batch, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = boxes.width / width * torch.where(flip, -1.0, 1.0)
    theta[:, 0, 2] = (2 * boxes.left + boxes.width) / width - 1
    theta[:, 1, 1] = boxes.height / height
    theta[:, 1, 2] = (2 * boxes.top + boxes.height) / height - 1
    theta = theta.to(device=images.device, dtype=images.dtype)
    grid = F.affine_grid(theta, [batch, 3, size, size], align_corners=False)
    crops = F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
    return crops.clamp(0.0, 1.0)  # bicubic overshoots at edges


def colour_jitter(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """ColorJitter(0.4, 0.4, 0.2, 0.1) with probability 0.8, per sample in a random order (each op runs once
    per step on the samples that take it)."""
    n, hue = images.shape[0], JITTER[3]
    factors = torch.stack([_uniform(1 - j, 1 + j, (n,), generator) for j in JITTER[:3]]
                          + [_uniform(-hue, hue, (n,), generator)], dim=1)
    order = torch.rand(n, len(JITTER_OPS), generator=generator).argsort(dim=1)  # a permutation per sample
    jittered = _chance(JITTER_P, n, generator)
    for step in range(len(JITTER_OPS)):
        for op_index, op in enumerate(JITTER_OPS):
            images = _apply_where(images, jittered & (order[:, step] == op_index), op, factors[:, op_index])
    return images


def random_grayscale(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    gray = _chance(GRAYSCALE_P, images.shape[0], generator).to(images.device).view(-1, 1, 1, 1)
    return torch.where(gray, colour.grayscale(images).expand_as(images), images)


def blur_sigma_range(size: int, reference: int) -> tuple[float, float]:
    """DINO's blur sigma range scaled from the ``reference`` crop side it was set for to ``size``: else a 56 px
    crop would be blurred as a 224 px one, four times over, wiping out nuclei a few pixels wide."""
    return BLUR_SIGMA[0] * (size / reference), BLUR_SIGMA[1] * (size / reference)


def random_blur(images: torch.Tensor, p: float, sigma_range: tuple[float, float] = BLUR_SIGMA,
                generator: torch.Generator | None = None) -> torch.Tensor:
    n, _, height, width = images.shape
    sigma = _uniform(*sigma_range, (n,), generator)
    blurred = _chance(p, n, generator)
    # +-3 sigma holds all but ~0.3 % of the Gaussian's mass; reflect padding needs radius < side.
    radius = min(math.ceil(3 * sigma_range[1]), height - 1, width - 1)
    return _apply_where(images, blurred, partial(colour.gaussian_blur, radius=radius), sigma)


def random_solarise(images: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    solarised = _chance(p, images.shape[0], generator).to(images.device).view(-1, 1, 1, 1)
    return torch.where(solarised, colour.solarise(images), images)


@dataclass(frozen=True)
class TileView:
    """One crop of the tile-level recipe (blur sigma in output pixels)."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    blur_sigma: tuple[float, float]
    solarise_p: float = 0.0


class TileMultiCrop:
    """DINO's tile-level multi-crop: uint8 tiles [B, 3, H, W] -> 2 global + n_local normalised crops.

    Global crop 1: blur always; global crop 2: blur p 0.1, solarisation p 0.2; local crops: blur p 0.5. Every
    crop: random resized crop, horizontal flip, colour jitter, grayscale.
    """

    def __init__(self, normalisation: str, global_size: int = 224, local_size: int = 96, n_local: int = 8,
                 global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4)) -> None:
        if normalisation not in NORMALISATIONS:
            raise SettingError(f"unknown normalisation {normalisation!r}; choose one of {sorted(NORMALISATIONS)}")
        self.normalisation = normalisation
        global_sigma = blur_sigma_range(global_size, GLOBAL_REFERENCE)
        self.views = [
            TileView(global_size, global_scale, blur_p=1.0, blur_sigma=global_sigma),
            TileView(global_size, global_scale, blur_p=0.1, blur_sigma=global_sigma, solarise_p=0.2),
        ] + [TileView(local_size, local_scale, blur_p=0.5,
                      blur_sigma=blur_sigma_range(local_size, LOCAL_REFERENCE))] * n_local

    def __call__(self, tiles: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[1] != 3:
            raise ValueError(f"expected uint8 tiles [B, 3, H, W], got {tiles.dtype} {tuple(tiles.shape)}")
        pixels = tiles.float() / 255.0
        return [self._view(pixels, view, generator) for view in self.views]

    def _view(self, pixels: torch.Tensor, view: TileView, generator: torch.Generator | None) -> torch.Tensor:
        n, _, height, width = pixels.shape
        boxes = sample_resized_crop_boxes(n, height, width, view.scale, generator)
        x = resized_crop(pixels, boxes, view.size, flip=_chance(FLIP_P, n, generator))
        x = random_grayscale(colour_jitter(x, generator), generator)
        x = random_solarise(random_blur(x, view.blur_p, view.blur_sigma, generator), view.solarise_p, generator)
        return normalise(x * 255.0, self.normalisation)  # normalise takes 0-255 valued pixels


class RegionMultiCrop:
    """DINO's region-level multi-crop on token grids [B, C, rows, cols]: 2 global and n_local square crops at
    random positions, each mirrored along the columns with probability 0.5."""

    def __init__(self, global_size: int = 14, local_size: int = 6, n_local: int = 8) -> None:
        self.sizes = [global_size] * 2 + [local_size] * n_local

    def __call__(self, grids: torch.Tensor, generator: torch.Generator | None = None) -> list[torch.Tensor]:
        if grids.ndim != 4 or min(grids.shape[-2:]) < max(self.sizes):
            raise ValueError(f"expected token grids [B, C, rows, cols] of at least {max(self.sizes)}, "
                             f"got {tuple(grids.shape)}")
        return [self._crop(grids, size, generator) for size in self.sizes]

    @staticmethod
    def _crop(grids: torch.Tensor, size: int, generator: torch.Generator | None) -> torch.Tensor:
        n, _, rows, cols = grids.shape
        top = _randint_below(torch.full((n,), rows - size + 1), generator)
        left = _randint_below(torch.full((n,), cols - size + 1), generator)
        flip = _chance(FLIP_P, n, generator)
        device = grids.device
        offsets = torch.arange(size)
        row_index = (top[:, None] + offsets).to(device)
        col_index = (left[:, None] + torch.where(flip[:, None], offsets.flip(0), offsets)).to(device)
        sample = torch.arange(n, device=device)
        # Gather the [B, size, size] token positions from a channels-last view, then back to channels-first.
        tokens = grids.permute(0, 2, 3, 1)[sample[:, None, None], row_index[:, :, None], col_index[:, None, :]]
        return tokens.permute(0, 3, 1, 2).contiguous()
