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
    # a pretrained slide encoder (hipt_e2e.models.slide_encoders) with a linear head, fine-tuned on the tiles of
    # token grids (`name` and `hidden` are then not read), and its authors' weights file
    slide_encoder: str | None = None
    weights: str | None = None

    def architecture(self, dim: int) -> dict:
        """The model on `dim`-wide region embeddings, as bundles record it (hipt_e2e.models.bundle)."""
        if self.slide_encoder:
            return {"name": "slide_encoder", "slide_encoder": self.slide_encoder, "dropout": self.dropout}
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


class SlideEncoderClassifier(nn.Module):
    """A pretrained slide encoder with a linear head (RegionFC) on its embedding, trained end to end: a slide's
    tiles [N, in_dim] -> logits [1, n_classes]. When the encoder reads coordinates each row ends with the tile's
    level-0 x, y and the slide's level-0 tile side ([N, in_dim + 3]), so that a bag stays one tensor through
    slide-level training. `base`: the {path, sha256} of the authors' file it started from."""

    def __init__(self, encoder: nn.Module, width: int, n_classes: int, dropout: float = 0.25,
                 needs_coords: bool = False, layers: str = "", base: dict[str, str] | None = None) -> None:
        super().__init__()
        self.encoder, self.head = encoder, RegionFC(n_classes, width, None, dropout)
        self.needs_coords, self.layers, self.base = needs_coords, layers, base

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if self.needs_coords:
            embedding = self.encoder(tiles[:, :-3], tiles[:, -3:-1], int(tiles[0, -1]))
        else:
            embedding = self.encoder(tiles, None, None)
        return self.head(embedding[None])

    def depths(self) -> dict[str, int]:
        """Each encoder parameter's depth below the head, for layer-wise lr decay (BEiT's rule): in the stack of
        L layers at `layers` (a ModuleList) layer i's are L - i deep, those before the stack (input projection,
        class token; all of an encoder without one, FEATHER) L + 1, those after it (a final norm) 0, as the head."""
        names = [name for name, _ in self.encoder.named_parameters()]
        prefix = self.layers + "."
        stack = [i for i, name in enumerate(names) if self.layers and name.startswith(prefix)] or [len(names)]
        count = len(self.encoder.get_submodule(self.layers)) if self.layers else 0

        def depth(i: int, name: str) -> int:
            if i < stack[0]:
                return count + 1
            return count - int(name.removeprefix(prefix).split(".")[0]) if i <= stack[-1] else 0

        return {name: depth(i, name) for i, name in enumerate(names)}


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
