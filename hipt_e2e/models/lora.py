"""LoRA (Hu et al. 2021) on a frozen linear layer: y = W x + b + (alpha / r) B A x; B starts at zero, so an
adapted model starts exactly as its base. Our own few lines rather than peft (which brings transformers
into every install): the state-dict names `lora_a`, `lora_b` stay fixed, as saved adapters need.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from hipt_e2e.errors import SettingError

LORA_KEYS = ("lora_a", "lora_b")


class LoRALinear(nn.Module):
    """`base` (kept, frozen by its owner) plus a trainable rank-`rank` update scaled by alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        if rank < 1:
            raise SettingError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        self.rank, self.scale = rank, (alpha if alpha is not None else rank) / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scale


def add_lora(module: nn.Module, target: str, rank: int, alpha: float | None = None) -> int:
    """Wrap every nn.Linear named `target` (e.g. "qkv") inside `module` in a LoRALinear; returns how many."""
    count = 0
    for parent in list(module.modules()):
        child = getattr(parent, target, None)
        if isinstance(child, nn.Linear):
            setattr(parent, target, LoRALinear(child, rank, alpha))
            count += 1
    if not count:
        raise SettingError(f"no linear layer named {target!r} in {type(module).__name__} to adapt with LoRA")
    return count
