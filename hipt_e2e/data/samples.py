"""The shard sample format: one region (or tile) = encoded pixels + a JSON record.

Writers (shard building) and readers (streams, verify, bench) share these functions, so the format
is defined once. Pixel entries are `jpg` (lossy, `quality`), `png` or `npy` (both lossless).
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

ENCODINGS = {"jpeg": "jpg", "png": "png", "npy": "npy"}
PIXEL_EXTS = tuple(ENCODINGS.values())


def encode_pixels(rgb: np.ndarray, encoding: str = "jpeg", quality: int = 95) -> tuple[str, bytes]:
    """RGB uint8 [H, W, 3] -> (extension, bytes)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {sorted(ENCODINGS)}")
    buffer = io.BytesIO()
    if encoding == "npy":
        np.save(buffer, np.ascontiguousarray(rgb), allow_pickle=False)
    elif encoding == "png":
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    else:
        # 4:4:4 chroma: H&E detail lives in colour (eosin vs haematoxylin); 4:2:0 blurs it.
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return ENCODINGS[encoding], buffer.getvalue()


def decode_pixels(ext: str, data: bytes) -> np.ndarray:
    """(extension, bytes) -> RGB uint8 [H, W, 3]."""
    if ext == "npy":
        rgb = np.load(io.BytesIO(data), allow_pickle=False)
    elif ext in ("jpg", "png"):
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.array(image.convert("RGB"))  # a writable copy, as torch.from_numpy needs
    else:
        raise ValueError(f"unknown pixel entry {ext!r}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"decoded pixels have dtype {rgb.dtype} and shape {rgb.shape}, expected uint8 [H, W, 3]")
    return rgb


def sample_key(item_ordinal: int, index: int) -> str:
    """WebDataset key: no dots (they split key from extension), stable across parts and resumes."""
    return f"i{item_ordinal:07d}_r{index:06d}"


def pixel_entry(sample: dict) -> str:
    """The pixel extension present in a raw sample."""
    for ext in PIXEL_EXTS:
        if ext in sample:
            return ext
    raise ValueError(f"sample {sample.get('__key__')} has no pixel entry ({', '.join(PIXEL_EXTS)})")


def decode_sample(sample: dict) -> tuple[np.ndarray, dict[str, Any]]:
    """Raw webdataset sample (bytes per entry) -> (RGB uint8 [H, W, 3], record)."""
    ext = pixel_entry(sample)
    record = json.loads(sample["json"])
    return decode_pixels(ext, sample[ext]), record
