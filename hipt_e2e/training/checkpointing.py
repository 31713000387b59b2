"""Training checkpoints and weight exports, always written atomically (a crash never leaves a partial file
under the final name) and read without unpickling anything but tensors and plain containers; and what
every engine's resume needs (which checkpoint to continue, which settings may change, the log kept)."""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from hipt_e2e.config import Settings
from hipt_e2e.errors import SettingError
from hipt_e2e.io import atomic_open, atomic_write_text

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
TRAIN_LOG = "train_log.jsonl"


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


# Settings a resumed run may change: they decide when to stop, save or log, never what is computed. More
# cv.repeats only adds folds after the existing ones (repeat 0 keeps its split and seeds), so a finished
# one-repeat run continues to three without training its first five folds again.
RUN_CONTROL = ("out", "resume", "train.checkpoint_every", "train.stop_after", "train.log_every", "train.log_with",
               "cv.repeats")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; nothing of that step was applied or saved."""


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as {"optim.lr": value, ...}."""
    flat: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def resume_state(settings: Settings, path: Path) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None for a fresh run; refuses to overwrite or mix runs."""
    if not path.exists():
        if settings.resume:
            log.info("resume=true but %s does not exist yet: starting from scratch", path)
        return None
    if not settings.resume:
        raise FileExistsError(f"{path} exists: pass resume=true to continue that run, or choose another out=")
    state = load_checkpoint_state(path)
    saved, now = flatten_config(state["config"]), flatten_config(settings.to_mapping())
    # a setting added since the run was saved is no change while it has its default (what the run did)
    saved = {**{k: v for k, v in flatten_config(type(settings)().to_mapping()).items() if k not in saved}, **saved}
    changed = sorted(k for k in saved.keys() | now.keys()
                     if k not in RUN_CONTROL and saved.get(k) != now.get(k))
    if changed:
        raise SettingError(f"cannot resume {path}: settings differ from the saved run in {changed} "
                         f"(only {', '.join(RUN_CONTROL)} may change)")
    return state


def keep_log_before(path: Path, step: int) -> None:
    """Drop log lines of steps a resumed run will redo (a run may have gone past its last checkpoint)."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] < step]
        atomic_write_text(path, "".join(line + "\n" for line in lines))
