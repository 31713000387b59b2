"""Batched photometric operations with one parameter per sample: images float [B, 3, H, W] in [0, 1], factors
[B]. The maths follows torchvision's kernels, which take one factor per call (kernel launches per tile)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

LUMA_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision and PIL use for grayscale
SOLARISE_THRESHOLD = 0.5  # pixels in the upper half of the range are inverted (128 of 255 in PIL)


def _blend(image: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = factor.to(device=image.device, dtype=image.dtype).view(-1, 1, 1, 1)
    return (factor * image + (1.0 - factor) * other).clamp(0.0, 1.0)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> luma [B, 1, H, W]."""
    weights = torch.tensor(LUMA_WEIGHTS, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, torch.zeros_like(images), factor)


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    mean_luma = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean_luma, factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(images, grayscale(images), factor)


def _rgb_to_hsv(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    red, green, blue = images.unbind(dim=1)
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    # Grey pixels (chroma 0) get hue 0 and black ones saturation 0; the divisor of 1 avoids 0/0.
    saturation = chroma / torch.where(value > 0, value, torch.ones_like(value))
    safe_chroma = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(value == red, (green - blue) / safe_chroma,
                      torch.where(value == green, 2.0 + (blue - red) / safe_chroma, 4.0 + (red - green) / safe_chroma))
    return torch.remainder(hue / 6.0, 1.0), saturation, value


def _hsv_to_rgb(hue: torch.Tensor, saturation: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    # Closed form: channel n in (5, 3, 1) for (R, G, B) is v - v*s*clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6.
    offsets = torch.tensor([5.0, 3.0, 1.0], device=hue.device, dtype=hue.dtype).view(1, 3, 1, 1)
    k = torch.remainder(offsets + 6.0 * hue.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    value, saturation = value.unsqueeze(1), saturation.unsqueeze(1)
    return value - value * saturation * ramp


def adjust_hue(images: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by ``shift`` turns (torchvision's hue_factor, in [-0.5, 0.5])."""
    hue, saturation, value = _rgb_to_hsv(images)
    hue = torch.remainder(hue + shift.to(device=hue.device, dtype=hue.dtype).view(-1, 1, 1), 1.0)
    return _hsv_to_rgb(hue, saturation, value)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a (2*radius+1)-tap kernel per sample and reflect padding."""
    batch, channels, height, width = images.shape
    taps = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    sigma = sigma.to(device=images.device, dtype=images.dtype).view(-1, 1)
    kernels = torch.softmax(-0.5 * (taps / sigma) ** 2, dim=1)  # normalised Gaussian, [B, taps]
    # Grouped convolution: one group (and one kernel) per (sample, channel) plane.
    kernels = kernels.repeat_interleave(channels, dim=0)
    planes = F.pad(images.reshape(1, batch * channels, height, width), (radius,) * 4, mode="reflect")
    planes = F.conv2d(planes, kernels[:, None, None, :], groups=batch * channels)
    planes = F.conv2d(planes, kernels[:, None, :, None], groups=batch * channels)
    return planes.reshape(batch, channels, height, width)


def solarise(images: torch.Tensor) -> torch.Tensor:
    return torch.where(images >= SOLARISE_THRESHOLD, 1.0 - images, images)
