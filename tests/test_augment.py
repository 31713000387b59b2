"""Training-time region augmentation: poses keep the tile grid consistent, HED is exact, draws are seeded."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hipt_e2e.data.augment import (
    RGB_FROM_HED,
    AugmentSettings,
    augment_regions,
    hed_to_rgb,
    jitter_colour,
    pose,
    random_poses,
    rgb_to_hed,
)
from hipt_e2e.models.hipt import HIPT

TILE = 8


def tiled_regions(n: int = 6, rows: int = 4) -> torch.Tensor:
    """Regions [n, 3, rows*8, rows*8] whose tiles all differ (random texture)."""
    return torch.randint(0, 256, (n, 3, rows * TILE, rows * TILE), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)


def tiles_of(regions: torch.Tensor) -> torch.Tensor:
    """[M, 3, H, W] -> [M, rows, cols, 3, t, t], as HIPT.token_grids cuts them."""
    return regions.unflatten(3, (-1, TILE)).unflatten(2, (-1, TILE)).permute(0, 2, 4, 1, 3, 5)


@pytest.mark.parametrize("flip, turns", [(False, 1), (False, 2), (False, 3), (True, 0), (True, 1), (True, 3)])
def test_pose_moves_each_tile_to_its_rotated_place_rotated(flip: bool, turns: int) -> None:
    regions = tiled_regions(2)
    moved = tiles_of(pose(regions, flip, turns))
    source = tiles_of(regions)
    rows = source.shape[1]
    # where source tile (r, c) lands: the same pose applied to the grid of tile indices
    index = pose(torch.arange(rows * rows).view(rows, rows), flip, turns)
    for r in range(rows):
        for c in range(rows):
            origin = index[r, c].item()
            expected = pose(source[:, origin // rows, origin % rows], flip, turns)
            assert torch.equal(moved[:, r, c], expected), (r, c)


def test_random_poses_move_tissue_grids_with_their_regions() -> None:
    regions = tiled_regions(16)
    tissue = tiles_of(regions).float().mean(dim=(3, 4, 5))  # a per-tile statistic stands in for tissue
    moved, moved_tissue = random_poses(regions, tissue, AugmentSettings(), torch.Generator().manual_seed(3))
    assert torch.equal(tiles_of(moved).float().mean(dim=(3, 4, 5)), moved_tissue)
    assert not torch.equal(moved, regions)  # 16 regions: some pose is not the identity
    # every region keeps its own pixels (a pose is a permutation of them)
    assert torch.equal(moved.flatten(1).sort(dim=1).values, regions.flatten(1).sort(dim=1).values)
    # non-square regions turn only by half turns, keeping their shape
    wide = torch.zeros(8, 3, 16, 32, dtype=torch.uint8)
    assert random_poses(wide, None, AugmentSettings(), torch.Generator().manual_seed(0))[0].shape == wide.shape


def test_hed_round_trip_is_exact_and_stains_separate() -> None:
    pixels = torch.arange(256).repeat(3, 1).T.reshape(1, 3, 16, 16).contiguous()  # every value in each channel
    pixels = torch.cat([pixels, torch.randint(0, 256, (2, 3, 16, 16), generator=torch.Generator().manual_seed(1))])
    back = hed_to_rgb(rgb_to_hed(pixels.to(torch.uint8)))
    assert (back - pixels).abs().max() < 1e-3 and torch.equal(back.round().to(torch.uint8), pixels.to(torch.uint8))
    # a pixel of pure haematoxylin (optical density along H's vector) has only an H amount
    density = 0.8 * RGB_FROM_HED[0]
    pure = (256 * torch.exp(-density) - 1).view(1, 3, 1, 1)
    assert rgb_to_hed(pure)[0, :, 0, 0] == pytest.approx([0.8, 0.0, 0.0], abs=1e-5)


def test_colour_jitter_ranges_and_identity() -> None:
    regions = tiled_regions(4)
    off = AugmentSettings(hed_scale=0.0, hed_shift=0.0, brightness=0.0, contrast=0.0, saturation=0.0)
    assert torch.equal(jitter_colour(regions, off, torch.Generator().manual_seed(0)), regions)
    # brightness alone scales every pixel by one factor in [0.9, 1.1] per image
    bright = replace(off, brightness=0.1)
    out = jitter_colour(regions, bright, torch.Generator().manual_seed(0)).float()
    mask = (regions > 50) & (regions < 200)
    ratio = [(out[i][mask[i]] / regions[i][mask[i]].float()) for i in range(4)]
    assert all(0.89 < r.mean() < 1.11 and r.std() < 0.01 for r in ratio)
    assert len({round(r.mean().item(), 3) for r in ratio}) == 4  # a factor per image
    strong = replace(off, hed_scale=0.2, hed_shift=0.2)
    assert (jitter_colour(regions, strong, torch.Generator().manual_seed(0)).float() - regions).abs().mean() > 2


def test_augment_regions_seeded_and_per_tile() -> None:
    regions = tiled_regions(3)
    cfg = AugmentSettings(enabled=True)
    a = augment_regions(regions, None, cfg, TILE, torch.Generator().manual_seed(5))[0]
    b = augment_regions(regions, None, cfg, TILE, torch.Generator().manual_seed(5))[0]
    c = augment_regions(regions, None, cfg, TILE, torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c) and a.dtype == torch.uint8
    # per tile: a flat grey region's tiles get different colours; per region, one colour
    grey = torch.full((1, 3, 4 * TILE, 4 * TILE), 128, dtype=torch.uint8)
    still = replace(cfg, flips=False, rotations=False)
    for per, distinct in (("region", 1), ("tile", 16)):
        out = augment_regions(grey, None, replace(still, per=per), TILE, torch.Generator().manual_seed(0))[0]
        colours = {tuple(t.flatten(1)[:, 0].tolist()) for t in tiles_of(out)[0].flatten(0, 1)}
        assert len(colours) == distinct, per
    with pytest.raises(ValueError, match="augment.per"):
        AugmentSettings.from_mapping({**cfg.to_mapping(), "per": "slide"}, "augment.")


def test_model_sees_augmented_regions_as_tiles_in_place() -> None:
    """The model's tile grid of a posed region is the posed grid of the original's tile embeddings,
    when the tile encoder is blind to orientation (here: per-tile mean colour)."""
    class MeanColour(torch.nn.Identity):
        num_features = 3

        def forward(self, tiles: torch.Tensor) -> torch.Tensor:
            return tiles.mean(dim=(2, 3)) if tiles.dim() == 4 else tiles

        def set_grad_checkpointing(self, enable: bool = True) -> None:
            pass

    model = HIPT(MeanColour(), MeanColour(), MeanColour(), tile_px=TILE)
    regions = tiled_regions(1)
    for flip, turns in ((False, 1), (True, 3)):
        grid = model.token_grids(pose(regions, flip, turns))
        assert torch.allclose(grid, pose(model.token_grids(regions), flip, turns), atol=1e-6)
