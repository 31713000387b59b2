"""The slide model of HIPT (the global part of HIPT_LGP_FC) on region embeddings [M, dim]: global_phi ->
2 post-norm transformer layers over the regions -> gated-attention pooling -> global_rho -> classifier.
Names follow the released fold checkpoints.
"""
from __future__ import annotations

import torch
from torch import nn


class GatedAttentionPool(nn.Module):
    """Gated attention pooling (Ilse et al.): weights = softmax_M(c(tanh(a x) * sigmoid(b x)))."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[M, dim] -> (pooled [1, dim], attention weights [M] summing to 1)."""
        weights = self.attention_c(self.attention_a(x) * self.attention_b(x))[:, 0].softmax(dim=0)
        return weights[None] @ x, weights


class SlideTransformer(nn.Module):
    """HIPT_LGP_FC's global aggregator: region embeddings [M, dim] of one slide -> logits [1, n_classes]."""

    def __init__(self, n_classes: int, dim: int = 192, depth: int = 2, num_heads: int = 3,
                 ff_dim: int | None = None, dropout: float = 0.25) -> None:
        super().__init__()
        self.num_features = dim
        self.global_phi = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, dim_feedforward=ff_dim or dim, dropout=dropout, activation="relu", batch_first=True
        )
        self.global_transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.global_attn_pool = GatedAttentionPool(dim, dim, dropout)
        self.global_rho = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(dim, n_classes)

    def forward_features(self, regions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[M, dim] -> (slide embedding [1, dim], attention over the M regions [M])."""
        h = self.global_transformer(self.global_phi(regions)[None])[0]  # one slide = a batch of one sequence
        pooled, weights = self.global_attn_pool(h)
        return self.global_rho(pooled), weights

    def forward_head(self, slide: torch.Tensor) -> torch.Tensor:
        return self.classifier(slide)

    def forward(self, regions: torch.Tensor, return_attention: bool = False):
        """[M, dim] -> logits [1, n_classes], or (logits, attention [M]) with return_attention."""
        slide, weights = self.forward_features(regions)
        logits = self.forward_head(slide)
        return (logits, weights) if return_attention else logits


def vit_wsi(n_classes: int, **kwargs) -> SlideTransformer:
    """The HIPT slide model (192-d, 2 layers, 3 heads, dropout 0.25); keyword arguments override it."""
    return SlideTransformer(n_classes, **kwargs)
