"""The DINO projection head, laid out so the released checkpoints' ``head.*`` keys load unchanged."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hipt_e2e.errors import SettingError


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = weight_g * weight_v / ||weight_v||, the deprecated
    ``torch.nn.utils.weight_norm``'s maths and names, which the released DINO checkpoints use (its
    parametrizations replacement stores other names)."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's default initialisation
        # DINO starts every row at norm 1 (not at ||v||), whether or not the norm is trained.
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)


class DINOHead(nn.Module):
    """MLP (GELU, no batch norm) -> L2-normalised bottleneck -> weight-normalised prototype layer."""

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 nlayers: int = 3, norm_last_layer: bool = True) -> None:
        super().__init__()
        if nlayers < 1:
            raise SettingError(f"nlayers must be >= 1, got {nlayers}")
        widths = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.GELU()]
        self.mlp = nn.Sequential(*layers[:-1])  # no activation after the bottleneck
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        # A fixed norm of 1 makes the last layer a cosine similarity to the prototypes, which DINO
        # found to stabilise training.
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))
