"""Building the tile and region encoders from a recipe's ``model`` config section.

model:
  preset: hipt        # geometry from hipt_e2e.models.PRESETS (hipt | tiny)
  encoder: vit        # tile level only: vit (ViT256), cnn (a timm CNN projected to the same width), a
                      # pretrained encoder of hipt_e2e.models.foundation.ENCODERS (uni_v1, virchow2, resnet50,
                      # ...: weights from model.weights) or timm:ARCH (any timm model, kwargs in timm_kwargs)
  cnn: resnet50       # the timm CNN when encoder = cnn
  cnn_stem: default   # small: a ResNet's stem at stride 1 without max-pool (keeps small tiles' resolution)
  tile_input: resize  # pretrained encoders: resize tiles to the model's input as its card does | native
  timm_kwargs: {}     # timm.create_model kwargs for encoder = timm:ARCH
  tile:               # optional changes to the preset's tile geometry (null keeps the preset's value)
    patch_size: null
    embed_dim: null   # also the CNN's output width
    depth: null
    num_heads: null
    pos_grid: null
  region:             # region level only: changes to the preset's ViT4K geometry (in_dim = tile width)
    in_dim: null
    embed_dim: null
    depth: null
    num_heads: null
    pos_grid: null
  weights: null       # embedding recipes: a safetensors export, a state dict or a released DINO checkpoint
  trusted: false      # allow unpickling (released checkpoints need it; only for files you trust)
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

from hipt_e2e.models.bundle import (
    level_geometry,
    region_encoder_from,
    tile_architecture,
    tile_encoder_from,
)
from hipt_e2e.models.foundation import load_stage_weights, require_weights

log = logging.getLogger(__name__)

BACKBONE_EXPORT = "backbone.safetensors"  # what a DINO run exports: its teacher's backbone

TILE_OVERRIDES = ("patch_size", "embed_dim", "depth", "num_heads", "pos_grid")
REGION_OVERRIDES = ("in_dim", "embed_dim", "depth", "num_heads", "pos_grid")
REGION_MODEL_DEFAULTS = {"preset": "hipt", "region": dict.fromkeys(REGION_OVERRIDES)}
TILE_MODEL_DEFAULTS = {"preset": "hipt", "encoder": "vit", "cnn": "resnet50", "tile": dict.fromkeys(TILE_OVERRIDES),
                       "cnn_stem": "default", "tile_input": "resize", "timm_kwargs": {}}
WEIGHTS_DEFAULTS = {"weights": None, "trusted": False}


def build_tile_encoder(model: Mapping[str, Any], drop_path_rate: float = 0.0) -> nn.Module:
    """The tile encoder [B, 3, H, W] -> [B, D] named by the config, randomly initialised."""
    return tile_encoder_from(tile_architecture(model), drop_path_rate)


def with_grid_width(model: dict[str, Any], width: int | None) -> dict[str, Any]:
    """model.region.in_dim, when unset, from the width of the token grids it will embed (their lineage's: a
    pretrained encoder's width, 1024 for UNI, 2560 for Virchow2); the preset's when that is unknown."""
    if model["region"].get("in_dim") is None and width is not None:
        model["region"]["in_dim"] = width
    return model


def build_region_encoder(model: Mapping[str, Any], drop_path_rate: float = 0.0) -> nn.Module:
    """The region encoder (ViT4K) [B, D, rows, cols] -> [B, D'] of the config, randomly initialised."""
    return region_encoder_from(level_geometry(model, "region"), drop_path_rate)


def load_encoder_weights(encoder: nn.Module, model: Mapping[str, Any]) -> nn.Module:
    """Load model.weights into the encoder (every tensor must fit); without weights it stays random, except a
    pretrained tile encoder, which is refused without its weights."""
    require_weights(encoder, model["weights"], "model.weights")
    if model["weights"] is None:
        log.warning("model.weights is not set: using a randomly initialised %s (a baseline, not a result)",
                    type(encoder).__name__)
    else:
        load_stage_weights(encoder, model["weights"], trusted=model["trusted"])
    return encoder
