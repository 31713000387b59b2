"""Backbone + DINO head over a list of crops of different sizes."""
from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby

import torch
from torch import nn


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of consecutive crops with the same spatial size (the crops of
    one size are concatenated along the batch), then the head once on all the features.

    Output rows follow the input order, crop-major: [len(crops) * B, head_out], which is the layout
    DINOLoss expects. State-dict keys are ``backbone.*`` and ``head.*`` as in the released checkpoints.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        features = [
            self.backbone(torch.cat(list(same_size)))
            for _, same_size in groupby(crops, key=lambda crop: crop.shape[-2:])
        ]
        return self.head(torch.cat(features))
