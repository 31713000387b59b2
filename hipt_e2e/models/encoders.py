"""The tile and region encoders' settings (a recipe's ``model`` section: a preset's geometry and a recipe's
changes to it) and building the encoders from them."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from torch import nn

from hipt_e2e.config import Settings, bound, section
from hipt_e2e.models.bundle import region_architecture, tile_architecture, tile_encoder_from
from hipt_e2e.models.foundation import load_stage_weights, require_weights
from hipt_e2e.models.vit import vit4k

log = logging.getLogger(__name__)

BACKBONE_EXPORT = "backbone.safetensors"  # what a DINO run exports: its teacher's backbone


@dataclass(frozen=True)
class TileGeometry(Settings):
    """Changes to the preset's tile geometry (null keeps the preset's value)."""
    patch_size: int | None = bound(None, 1)
    embed_dim: int | None = bound(None, 1)  # also the CNN's output width
    depth: int | None = bound(None, 1)
    num_heads: int | None = bound(None, 1)
    pos_grid: int | None = bound(None, 1)


@dataclass(frozen=True)
class RegionGeometry(Settings):
    """Changes to the preset's ViT4K geometry (null keeps the preset's value; in_dim = the tile width)."""
    in_dim: int | None = bound(None, 1)
    embed_dim: int | None = bound(None, 1)
    depth: int | None = bound(None, 1)
    num_heads: int | None = bound(None, 1)
    pos_grid: int | None = bound(None, 1)


@dataclass(frozen=True)
class TileModel(Settings):
    """The tile encoder: a preset's ViT256, a timm CNN or a pretrained encoder."""
    preset: str = "hipt"  # geometry from hipt_e2e.models.PRESETS (hipt | tiny)
    # vit (ViT256), cnn (a timm CNN projected to the same width), a pretrained encoder of
    # hipt_e2e.models.foundation.ENCODERS (uni_v1, virchow2, resnet50, ...: weights from model.weights) or
    # timm:ARCH (any timm model, kwargs in timm_kwargs)
    encoder: str = "vit"
    cnn: str = "resnet50"  # the timm CNN when encoder = cnn
    tile: TileGeometry = section(TileGeometry)
    cnn_stem: Literal["default", "small"] = "default"  # small: a ResNet's stem at stride 1 without max-pool (keeps small tiles' resolution)
    tile_input: Literal["resize", "native"] = "resize"  # pretrained encoders: resize tiles to the model's input as its card does | native
    timm_kwargs: dict = field(default_factory=dict)  # timm.create_model kwargs for encoder = timm:ARCH


@dataclass(frozen=True)
class RegionModel(Settings):
    """The region encoder (ViT4K)."""
    preset: str = "hipt"  # geometry from hipt_e2e.models.PRESETS (hipt | tiny)
    region: RegionGeometry = section(RegionGeometry)


@dataclass(frozen=True)
class WeightsFile(Settings):
    """The weights an embedding recipe loads into its encoder."""
    weights: str | None = None  # a safetensors export, a state dict or a released DINO checkpoint
    trusted: bool = False  # allow unpickling (released checkpoints need it; only for files you trust)


@dataclass(frozen=True)
class TileModelWithWeights(WeightsFile, TileModel):
    """embed_tiles' model section: the tile encoder and its weights."""


@dataclass(frozen=True)
class RegionModelWithWeights(WeightsFile, RegionModel):
    """embed_regions' model section: the region encoder and its weights."""


R = TypeVar("R", bound=RegionModel)


def build_tile_encoder(model: TileModel, drop_path_rate: float = 0.0) -> nn.Module:
    """The tile encoder [B, 3, H, W] -> [B, D] of a model section, randomly initialised."""
    return tile_encoder_from(tile_architecture(model), drop_path_rate)


def with_grid_width(model: R, width: int | None) -> R:
    """model.region.in_dim, when unset, from the width of the token grids it will embed (when known)."""
    if model.region.in_dim is None and width is not None:
        return model.with_changes(**{"region.in_dim": width})
    return model


def build_region_encoder(model: RegionModel, drop_path_rate: float = 0.0) -> nn.Module:
    """The region encoder (ViT4K) [B, D, rows, cols] -> [B, D'] of a model section, randomly initialised."""
    return vit4k(**region_architecture(model), drop_path_rate=drop_path_rate)


def load_encoder_weights(encoder: nn.Module, model: WeightsFile) -> nn.Module:
    """Load model.weights strictly into the encoder; without, it stays random (a pretrained one is refused)."""
    require_weights(encoder, model.weights, "model.weights")
    if model.weights is None:
        log.warning("model.weights is not set: using a randomly initialised %s (a baseline, not a result)",
                    type(encoder).__name__)
    else:
        load_stage_weights(encoder, model.weights, trusted=model.trusted)
    return encoder
