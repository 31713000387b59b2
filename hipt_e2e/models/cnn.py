"""A CNN tile encoder: any timm CNN, globally pooled and projected to the ViT256 width.

With the same output size as ViT256 every later stage (token grids, ViT4K, slide model) works
unchanged whichever tile encoder is used.
"""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from .checkpoint import load_checkpoint


class CNNTileEncoder(nn.Module):
    """Normalised tiles [B, 3, H, W] -> [B, embed_dim] via timm CNN `cnn` + linear `proj`."""

    def __init__(self, name: str = "resnet50", embed_dim: int = 384, weights: str | Path | None = None,
                 **timm_kwargs) -> None:
        super().__init__()
        # pretrained=False: never reach for the hub; weights come from a local file or nowhere.
        self.cnn = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
        if weights is not None:
            load_checkpoint(self.cnn, weights)
        self.proj = nn.Linear(self.cnn.num_features, embed_dim)
        self.embed_dim = self.num_features = embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.cnn.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.cnn(x))


def cnn256(name: str = "resnet50", **kwargs) -> CNNTileEncoder:
    """A timm CNN as the tile encoder (random init, or `weights=` a local state-dict file)."""
    return CNNTileEncoder(name, **kwargs)
