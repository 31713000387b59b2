"""The shard sample format, for writers and readers alike: one region (or tile) = encoded pixels + a JSON record.

Pixel entries are `jpg`, `png` or `npy`; token grids [C, rows, cols] are `grid.npy`, decoded like pixels so the
same streams and checks serve both (the record's height/width are then the grid's rows/cols).
"""
from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image

from hipt_e2e.errors import SettingError

try:  # torchvision's libjpeg-turbo decoder: Pillow's pixels exactly, 25 % faster and channels-first already
    from torchvision.io import ImageReadMode, decode_jpeg  # (benchmarks/bench_jpeg_decoders.py)
except ImportError:  # deprecated since torchvision 0.29 (for TorchCodec): once removed, Pillow decodes
    decode_jpeg = None
TORCHVISION_DECODES_LISTS = tuple(int(part) for part in torchvision.__version__.split(".")[:2]) >= (0, 20)
# torchvision >= 0.29 warns on every call that its decoders move to TorchCodec; they still work.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")

log = logging.getLogger(__name__)

ENCODINGS = {"jpeg": "jpg", "png": "png", "npy": "npy"}
DECODE_MODES = ("cpu", "gpu")
GRID_EXT = "grid.npy"
PIXEL_EXTS = (*ENCODINGS.values(), GRID_EXT)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def npy_array(data: bytes) -> np.ndarray:
    """Arrays only: object arrays (which would need unpickling) are refused."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_pixels(rgb: np.ndarray, encoding: str = "jpeg", quality: int = 95) -> tuple[str, bytes]:
    """RGB uint8 [H, W, 3] -> (extension, bytes)."""
    if encoding not in ENCODINGS:
        raise SettingError(f"unknown encoding {encoding!r}; choose one of {sorted(ENCODINGS)}")
    if encoding == "npy":
        return "npy", npy_bytes(rgb)
    buffer = io.BytesIO()
    if encoding == "png":
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
    else:
        # 4:4:4 chroma: H&E detail lives in colour (eosin vs haematoxylin); 4:2:0 blurs it. Optimised
        # Huffman tables: ~9 % fewer bytes for the same pixels, paid once at build time.
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=quality, subsampling=0, optimize=True)
    return ENCODINGS[encoding], buffer.getvalue()


def encode_grid(grid: np.ndarray) -> tuple[str, bytes]:
    """Token grid float [C, rows, cols] -> (extension, bytes)."""
    return GRID_EXT, npy_bytes(grid)


@dataclass(frozen=True)
class JpegBatch:
    """JPEG regions left encoded for the device (data.decode=gpu); `device_pixels` decodes a batch in one call."""
    data: tuple[torch.Tensor, ...]  # uint8 [n_bytes] each
    shape: tuple[int, int, int]  # [3, H, W] of every region (from the records; checked after decoding)

    def __len__(self) -> int:
        return len(self.data)


def _jpeg_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def decode_mode(requested: str, device: torch.device) -> str:
    """The decoding that will run: "gpu" (nvJPEG) needs a CUDA device, else the CPU decodes (and the log says so)."""
    if requested not in DECODE_MODES:
        raise SettingError(f"data.decode={requested!r}: choose one of {list(DECODE_MODES)}")
    if requested == "gpu" and (device.type != "cuda" or decode_jpeg is None):
        reason = f"the device is {device}" if decode_jpeg is not None else "this torchvision has no decode_jpeg"
        log.warning("data.decode=gpu but %s: JPEG regions are decoded on the CPU", reason)
        return "cpu"
    return requested


def decode_pixels(ext: str, data: bytes, record: dict[str, Any] | None = None,
                  decode: str = "cpu") -> torch.Tensor | JpegBatch:
    """(extension, bytes) -> contiguous RGB uint8 [3, H, W] (a token grid: float [C, rows, cols]); decode="gpu"
    leaves a JPEG encoded, a JpegBatch of one sized by the record."""
    if decode == "gpu" and ext == "jpg":
        return JpegBatch((_jpeg_tensor(data),), (3, record["height"], record["width"]))
    if ext == GRID_EXT:
        grid = npy_array(data)
        if grid.dtype.kind != "f" or grid.ndim != 3:
            raise ValueError(f"decoded token grid has dtype {grid.dtype} and shape {grid.shape}, "
                             "expected float [C, rows, cols]")
        return torch.from_numpy(grid)
    if ext == "jpg" and decode_jpeg is not None:
        return decode_jpeg(_jpeg_tensor(data), mode=ImageReadMode.RGB)
    if ext == "npy":
        rgb = npy_array(data)
    elif ext in ("jpg", "png"):
        with Image.open(io.BytesIO(data)) as image:
            rgb = np.asarray(image if image.mode == "RGB" else image.convert("RGB"))  # read-only; copied below
    else:
        raise ValueError(f"unknown pixel entry {ext!r}")
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"decoded pixels have dtype {rgb.dtype} and shape {rgb.shape}, expected uint8 [H, W, 3]")
    # One copy, to channels-first and writable (as torch.from_numpy needs): numpy's transposing copy of
    # uint8 HWC is ~3x faster than torch's permute().contiguous(), which readers would otherwise pay.
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def sample_key(item_ordinal: int, index: int) -> str:
    """WebDataset key: no dots (they split key from extension), stable across parts and resumes."""
    return f"i{item_ordinal:07d}_r{index:06d}"


def pixel_entry(sample: dict) -> str:
    """The pixel extension present in a raw sample."""
    for ext in PIXEL_EXTS:
        if ext in sample:
            return ext
    raise ValueError(f"sample {sample.get('__key__')} has no pixel entry ({', '.join(PIXEL_EXTS)})")


def decode_sample(sample: dict, decode: str = "cpu") -> tuple[torch.Tensor | JpegBatch, dict[str, Any]]:
    """Raw webdataset sample (bytes per entry) -> (pixels as decode_pixels gives them, record)."""
    ext = pixel_entry(sample)
    record = json.loads(sample["json"])
    return decode_pixels(ext, sample[ext], record, decode), record


def stack_pixels(items: Sequence[torch.Tensor | JpegBatch]) -> torch.Tensor | JpegBatch:
    """Regions of one batch -> uint8 [B, 3, H, W], or one JpegBatch when they are still encoded."""
    if not isinstance(items[0], JpegBatch):
        return torch.stack(items)
    shapes = {item.shape for item in items}
    if len(shapes) > 1:
        raise ValueError(f"regions of one batch differ in size {sorted(shapes)}")
    return JpegBatch(tuple(data for item in items for data in item.data), items[0].shape)


def collate(items: Sequence[dict]) -> dict:
    """Stack the "pixels" (or token grids) of stream items; every other field becomes a list (records hold
    None values, which the default collate refuses)."""
    batch = {key: [item[key] for item in items] for key in items[0] if key != "pixels"}
    batch["pixels"] = stack_pixels([item["pixels"] for item in items])
    return batch


def device_pixels(pixels: torch.Tensor | JpegBatch, device: torch.device) -> torch.Tensor:
    """A batch's pixels on `device`: tensors copied (non-blocking), a JpegBatch decoded there in one call."""
    if not isinstance(pixels, JpegBatch):
        return pixels.to(device, non_blocking=True)
    if decode_jpeg is None:
        raise SettingError("data.decode=gpu needs torchvision's decode_jpeg (nvJPEG), which this torchvision lacks")
    if TORCHVISION_DECODES_LISTS:
        decoded = decode_jpeg(list(pixels.data), mode=ImageReadMode.RGB, device=device)
    else:  # torchvision 0.19 (the floor) decodes one JPEG per call; 0.20 took lists (one nvJPEG batch)
        decoded = [decode_jpeg(data, mode=ImageReadMode.RGB, device=device) for data in pixels.data]
    wrong = {tuple(region.shape) for region in decoded} - {pixels.shape}
    if wrong:
        raise ValueError(f"decoded JPEG regions of size {sorted(wrong)}, their records say {pixels.shape}")
    return torch.stack(decoded)
