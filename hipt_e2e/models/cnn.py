"""A CNN tile encoder: any timm CNN, globally pooled and projected to the ViT256 width, so every later
stage works unchanged whichever tile encoder is used."""
from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from hipt_e2e.errors import SettingError

from .checkpoint import load_checkpoint


class CNNTileEncoder(nn.Module):
    """Normalised tiles [B, 3, H, W] -> [B, embed_dim] via timm CNN `cnn` + linear `proj`.

    stem="small": a ResNet's 7 x 7 stride-2 convolution and max-pool become one 3 x 3 stride-1 convolution,
    so small tiles keep their resolution (at 64 px the last stage sees 8 x 8 instead of 2 x 2).
    """

    def __init__(self, name: str = "resnet50", embed_dim: int = 384, weights: str | Path | None = None,
                 stem: str = "default", **timm_kwargs) -> None:
        super().__init__()
        # pretrained=False: never reach for the hub; weights come from a local file or nowhere.
        self.cnn = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs)
        if stem == "small":
            if not isinstance(getattr(self.cnn, "conv1", None), nn.Conv2d) or not hasattr(self.cnn, "maxpool"):
                raise SettingError(f"model.cnn_stem=small needs a ResNet-style CNN (conv1 + maxpool), not {name}")
            self.cnn.conv1 = nn.Conv2d(3, self.cnn.conv1.out_channels, 3, stride=1, padding=1, bias=False)
            self.cnn.maxpool = nn.Identity()
        elif stem != "default":
            raise SettingError(f"model.cnn_stem must be default or small, got {stem!r}")
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
