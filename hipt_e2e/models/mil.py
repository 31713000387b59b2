"""Baselines on region embeddings, with the slide transformer's inputs: attention-MIL and the per-region FC."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from hipt_e2e.config import Settings, bound
from hipt_e2e.errors import SettingError

from .slide import GatedAttentionPool

SlideModelName = Literal["vit_wsi", "abmil", "fc"]  # HIPT's slide transformer | attention-MIL | FC + vote
Vote = Literal["majority", "mean"]  # how the FC's region probabilities make a slide's (`vote`)


@dataclass(frozen=True)
class SlideModel(Settings):
    """The `model` section of slide-level training: the model on a slide's region embeddings."""
    name: SlideModelName = "vit_wsi"
    dropout: float = bound(0.25, 0.0, 1.0)
    hidden: int | None = bound(None, 0)  # abmil and fc: width of their hidden layer; null: the embeddings' width

    def architecture(self, dim: int) -> dict:
        """The model on `dim`-wide region embeddings, as bundles record it (hipt_e2e.models.bundle)."""
        if self.name == "vit_wsi":
            return {"name": self.name, "dim": dim, "depth": 2, "num_heads": 3 if dim % 3 == 0 else 1,
                    "dropout": self.dropout}
        return {"name": self.name, "dim": dim, "hidden": self.hidden, "dropout": self.dropout}


class AttentionMIL(nn.Module):
    """ABMIL (Ilse et al. 2018): [M, dim] -> fc -> gated attention pooling -> classifier -> [1, n_classes]."""

    def __init__(self, n_classes: int, dim: int = 192, hidden: int | None = None, dropout: float = 0.25) -> None:
        super().__init__()
        hidden = hidden or dim
        self.fc = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attn_pool = GatedAttentionPool(hidden, hidden, dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def forward(self, regions: torch.Tensor, return_attention: bool = False):
        pooled, weights = self.attn_pool(self.fc(regions))
        logits = self.classifier(pooled)
        return (logits, weights) if return_attention else logits


class RegionFC(nn.Module):
    """The FC alternative: each region embedding [N, dim] -> logits [N, n_classes] (slides by vote)."""

    def __init__(self, n_classes: int, dim: int = 192, hidden: int | None = None, dropout: float = 0.25) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers, nn.Linear(hidden or dim, n_classes))

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        return self.net(regions)


def vote(region_probs: np.ndarray, method: str = "majority") -> np.ndarray:
    """Slide probabilities from its regions' [M, K]. majority: the share of regions predicting each class, ties
    broken by the mean probability (a 1e-6 nudge that never outweighs one vote); mean: the mean probability."""
    region_probs = np.asarray(region_probs, dtype=np.float64)
    mean = region_probs.mean(axis=0)
    if method == "mean":
        return mean
    if method != "majority":
        raise SettingError(f"unknown vote {method!r}; choose majority or mean")
    votes = np.bincount(region_probs.argmax(axis=1), minlength=region_probs.shape[1]) / len(region_probs)
    scores = votes + 1e-6 * mean
    return scores / scores.sum()
