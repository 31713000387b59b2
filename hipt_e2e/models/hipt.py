"""The nested HIPT model: uint8 regions of one slide -> slide logits, differentiable end to end.

regions [M, 3, H, W] -> tiles in raster order -> normalise -> tile encoder in chunks -> token grids
[M, D, rows, cols] -> region encoder -> [M, 192] -> slide model. Training memory stays bounded by
checkpointing chunks of tiles and, optionally, individual ViT blocks.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hipt_e2e.errors import SettingError

from ..normalise import NORMALISATIONS, normalise
from .cnn import cnn256
from .presets import model_preset
from .slide import SlideTransformer, vit_wsi
from .vit import RegionViT, vit4k, vit256

STAGES = ("tile", "region", "slide")


def tokens_to_grid(tokens: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Tile embeddings in raster order [M, rows*cols, D] -> token grids [M, D, rows, cols]."""
    return tokens.unflatten(1, (rows, cols)).permute(0, 3, 1, 2)


def token_grids(encoder: nn.Module, regions: torch.Tensor, tile_px: int, normalisation: str, tiles_per_call: int,
                tile_mask: torch.Tensor | None = None, checkpoint_chunks: bool = False) -> torch.Tensor:
    """uint8 regions [M, 3, H, W] -> token grids [M, D, rows, cols], grid[:, :, r, c] = tile r*cols + c, the tiles
    of all regions encoded `tiles_per_call` at a time. tile_mask [M, rows, cols] (True = skip): zero embeddings.
    Checkpointed chunks keep only their index and output; pixels are gathered again in backward.
    """
    n_regions, channels, height, width = regions.shape
    if channels != 3 or height % tile_px or width % tile_px:
        raise ValueError(f"expected regions [M, 3, H, W] with H, W multiples of {tile_px}, got {tuple(regions.shape)}")
    rows, cols = height // tile_px, width // tile_px
    if tile_mask is not None and tuple(tile_mask.shape) != (n_regions, rows, cols):
        raise ValueError(f"tile_mask must be [M, rows, cols] = {(n_regions, rows, cols)}, got {tuple(tile_mask.shape)}")
    tiles = regions.unflatten(3, (cols, tile_px)).unflatten(2, (rows, tile_px)).permute(0, 2, 4, 1, 3, 5)  # a view
    n_tiles = n_regions * rows * cols
    keep = torch.arange(n_tiles, device=regions.device)
    if tile_mask is not None:
        keep = keep[~tile_mask.flatten()]
        if len(keep) == 0:
            raise ValueError("tile_mask skips every tile; drop such regions instead")

    def encode(index: torch.Tensor) -> torch.Tensor:
        return encoder(normalise(tiles[index // (rows * cols), index // cols % rows, index % cols], normalisation))

    recompute = checkpoint_chunks and torch.is_grad_enabled()
    embeddings = torch.cat([checkpoint(encode, chunk, use_reentrant=False) if recompute else encode(chunk)
                            for chunk in keep.split(tiles_per_call)])
    if tile_mask is not None:
        embeddings = embeddings.new_zeros(n_tiles, embeddings.shape[1]).index_copy(0, keep, embeddings)
    return tokens_to_grid(embeddings.view(n_regions, rows * cols, -1), rows, cols)


class HIPTAttention(NamedTuple):
    tile: torch.Tensor  # [M, heads, rows, cols]: each region's CLS attention over its tiles (ViT4K, last block)
    region: torch.Tensor  # [M]: the slide model's attention-pooling weights over the regions


class HIPT(nn.Module):
    """Tile encoder -> region encoder -> slide model on the uint8 regions of ONE slide.

    freeze_*: a frozen stage gets no gradients, stays in eval mode and, when every stage before it is frozen
    too, builds no graph. checkpoint_chunks / checkpoint_blocks: over chunks of tiles / every ViT block.
    """

    def __init__(self, tile_encoder: nn.Module, region_encoder: RegionViT, slide_model: SlideTransformer, *,
                 tile_px: int = 256, normalisation: str = "hipt", chunk_size: int = 256, freeze_tile: bool = False,
                 freeze_region: bool = False, freeze_slide: bool = False, checkpoint_chunks: bool = False,
                 checkpoint_blocks: bool = False) -> None:
        super().__init__()
        if normalisation not in NORMALISATIONS:
            raise SettingError(f"unknown normalisation {normalisation!r}; choose one of {sorted(NORMALISATIONS)}")
        self.tile_encoder, self.region_encoder, self.slide_model = tile_encoder, region_encoder, slide_model
        self.tile_px, self.normalisation, self.chunk_size = tile_px, normalisation, chunk_size
        self.frozen = dict.fromkeys(STAGES, False)
        self.set_frozen(tile=freeze_tile, region=freeze_region, slide=freeze_slide)
        self.set_grad_checkpointing(chunks=checkpoint_chunks, blocks=checkpoint_blocks)

    @classmethod
    def from_preset(cls, preset: str = "hipt", n_classes: int = 2, *, cnn: str | None = None, **settings) -> HIPT:
        """Build from a named geometry (see presets.py); `cnn` names a timm CNN to use as tile encoder."""
        geometry = model_preset(preset)
        tile_encoder = cnn256(cnn, embed_dim=geometry["tile"]["embed_dim"]) if cnn else vit256(**geometry["tile"])
        return cls(tile_encoder, vit4k(**geometry["region"]), vit_wsi(n_classes, **geometry["slide"]),
                   tile_px=geometry["tile_px"], **settings)

    def stage(self, name: str) -> nn.Module:
        """The module of a stage by name: tile, region or slide."""
        return {"tile": self.tile_encoder, "region": self.region_encoder, "slide": self.slide_model}[name]

    def set_frozen(self, *, tile: bool | None = None, region: bool | None = None, slide: bool | None = None) -> None:
        """Freeze (True) or unfreeze (False) stages; None leaves a stage as it is."""
        for stage, flag in zip(STAGES, (tile, region, slide)):
            if flag is not None:
                self.frozen[stage] = flag
                self.stage(stage).requires_grad_(not flag).train(self.training and not flag)

    def set_grad_checkpointing(self, chunks: bool = True, blocks: bool = False) -> None:
        self.checkpoint_chunks = chunks
        self.tile_encoder.set_grad_checkpointing(blocks)
        self.region_encoder.set_grad_checkpointing(blocks)

    def train(self, mode: bool = True) -> HIPT:
        super().train(mode)
        for stage, flag in self.frozen.items():
            if flag:
                self.stage(stage).eval()
        return self

    def _grad(self, *stages: str) -> torch.autograd.grad_mode.set_grad_enabled:
        """No graph through a stage when it and every stage before it are frozen (nothing to train)."""
        return torch.set_grad_enabled(torch.is_grad_enabled() and not all(self.frozen[s] for s in stages))

    def token_grids(self, regions: torch.Tensor, tile_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`token_grids` with this model's tile encoder, chunks and checkpointing."""
        with self._grad("tile"):
            return token_grids(self.tile_encoder, regions, self.tile_px, self.normalisation, self.chunk_size,
                               tile_mask, self.checkpoint_chunks)

    def region_embeddings(self, regions: torch.Tensor, tile_mask: torch.Tensor | None = None,
                          return_attention: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """uint8 regions [M, 3, H, W] -> region embeddings [M, 192] (and the ViT4K's CLS attention over tiles)."""
        grids = self.token_grids(regions, tile_mask)
        with self._grad("tile", "region"):
            embeddings, attention = self.region_encoder.forward_with_attention(grids)
        return (embeddings, attention) if return_attention else embeddings

    def forward(self, regions: torch.Tensor, tile_mask: torch.Tensor | None = None, return_attention: bool = False,
                bag_sizes: Sequence[int] | None = None) -> torch.Tensor | tuple[torch.Tensor, HIPTAttention]:
        """uint8 regions of one slide [M, 3, H, W] -> logits [1, n_classes] (and HIPTAttention). bag_sizes: the
        regions of several slides, concatenated, with each one's count -> logits [n_slides, n_classes]."""
        embeddings, tile_attention = self.region_embeddings(regions, tile_mask, return_attention=True)
        if bag_sizes is not None:
            if return_attention:
                raise ValueError("return_attention is for one slide at a time (no bag_sizes)")
            return torch.cat([self.slide_model(bag) for bag in embeddings.split(list(bag_sizes))])
        logits, region_attention = self.slide_model(embeddings, return_attention=True)
        return (logits, HIPTAttention(tile_attention, region_attention)) if return_attention else logits
