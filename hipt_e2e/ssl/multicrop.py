"""Backbone + DINO head over a list of crops of different sizes."""
from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    """The backbone once per run of consecutive same-size crops (concatenated), then the head once on all:
    [len(crops) * B, head_out], crop-major as DINOLoss expects. Keys ``backbone.*``, ``head.*`` as released.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        same_sizes = groupby(crops, key=lambda crop: crop.shape[-2:])
        features = [self.backbone(torch.cat(list(same_size))) for _, same_size in same_sizes]
        return self.head(torch.cat(features))
