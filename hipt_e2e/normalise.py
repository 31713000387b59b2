"""Pixel normalisation, the one place uint8 pixels become model inputs: a recorded setting (the released HIPT
weights: mean 0.5, std 0.5; the original DINO pretraining: ImageNet's; pretrained encoders: their own).
"""
from __future__ import annotations

import torch

from hipt_e2e.errors import SettingError

NORMALISATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "hipt": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # the statistics pretrained pathology encoders were trained with (hipt_e2e.models.foundation)
    "hoptimus": ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)),
    "lunit": ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464)),
}


def normalise(pixels: torch.Tensor, name: str = "hipt", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (or 0-255 valued) pixels [..., 3, H, W] -> normalised float tensor of the same shape."""
    if name not in NORMALISATIONS:
        raise SettingError(f"unknown normalisation {name!r}; choose one of {sorted(NORMALISATIONS)}")
    if pixels.shape[-3] != 3:
        raise ValueError(f"expected 3 channels at dim -3, got shape {tuple(pixels.shape)}")
    mean, std = (torch.tensor(v, dtype=dtype, device=pixels.device).view(3, 1, 1) for v in NORMALISATIONS[name])
    return (pixels.to(dtype) / 255.0 - mean) / std
