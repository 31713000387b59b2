"""Training checkpoints and weight exports, always written atomically (a crash never leaves a partial file
under the final name) and read without unpickling anything but tensors and plain containers."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from hipt_e2e.io import atomic_open

CHECKPOINT = "checkpoint.pt"


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> None:
    """``state`` holds tensors, state dicts and plain Python values only (no custom objects)."""
    with atomic_open(path, "wb") as handle:
        torch.save(dict(state), handle)


def load_checkpoint_state(path: str | Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def export_safetensors(module: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None,
                       keys: Sequence[str] | None = None) -> Path:
    """The module's state dict (only `keys` when given) as safetensors, under the module's own key names."""
    state = module.state_dict()
    # safetensors refuses tensors sharing storage; contiguous copies always qualify.
    tensors = {key: state[key].detach().cpu().contiguous().clone() for key in (state if keys is None else keys)}
    with atomic_open(path, "wb") as handle:
        handle.write(safetensors_bytes(tensors, metadata=dict(metadata or {})))
    return Path(path)
