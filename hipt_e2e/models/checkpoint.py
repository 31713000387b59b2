"""Loading HIPT weights: released DINO checkpoints, plain state dicts and safetensors exports.

Released checkpoints pickle Python objects (an argparse.Namespace), and unpickling can run arbitrary code:
it is only done for files the caller trusts; `hipt-convert` turns one into safetensors once.
"""
from __future__ import annotations

import logging
import pickle
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load_file
from torch import nn

from hipt_e2e.errors import UserError

log = logging.getLogger(__name__)

WRAPPER_PREFIXES = ("module.", "backbone.")  # DDP wrapper, then DINO's MultiCropWrapper
DINO_HEAD_PREFIXES = ("head.mlp.", "head.last_layer.")

Source = str | Path | Mapping[str, torch.Tensor]


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read safely or does not fit the model."""


class LoadResult(NamedTuple):
    missing: list[str]
    unexpected: list[str]


def read_state_dict(source: Source, *, trusted: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint file or dict -> the backbone's tensors under the released key names (the DINO teacher
    or the wrapped `model` when present, `module.` / `backbone.` stripped, the DINO head dropped)."""
    raw = source if isinstance(source, Mapping) else _read_file(Path(source), trusted)
    for wrapper in ("teacher", "model"):  # DINO's teacher; the `model` of MAE-style files (Prov-GigaPath's slide encoder)
        if isinstance(raw.get(wrapper), Mapping):
            raw = raw[wrapper]
    state = {}
    for key, value in raw.items():
        for prefix in WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        if key.startswith(DINO_HEAD_PREFIXES):
            continue
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{_name(source)} is not a state dict: entry {key!r} is a {type(value).__name__}")
        state[key] = value
    return state


def _read_file(path: Path, trusted: bool) -> Mapping:
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=not trusted)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"e.g. {found.group(1)}" if found else "refused by torch.load(weights_only=True)"
        raise CheckpointError(f"{path} holds pickled Python objects besides tensors ({what}), as released HIPT/DINO "
                              "training checkpoints do (they store an argparse.Namespace). Unpickling can execute "
                              "arbitrary code, so it is refused by default: if you trust the file pass trusted=True, "
                              f"or convert it once with `hipt-convert {path} OUT.safetensors --trusted` and load the "
                              "safetensors file.") from err


def load_checkpoint(module: nn.Module, source: Source, *, trusted: bool = False, prefix: str = "",
                    strict: bool = False) -> LoadResult:
    """Load a file (.pth/.pt, weights only unless `trusted`; .safetensors) or state dict into `module`.

    prefix: only keys under it, stripped (e.g. "local_vit." for the region encoder of an HIPT_LGP_FC fold).
    CheckpointError when no tensor matches or a shape differs; missing/unexpected keys are logged and
    returned (raised when strict).
    """
    state = read_state_dict(source, trusted=trusted)
    if prefix:
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    own = module.state_dict()
    model = type(module).__name__
    if not own.keys() & state.keys():
        raise CheckpointError(f"no tensor of {_name(source)} belongs to {model}: the file has keys like "
                              f"{_sample(state)}, the model {_sample(own)}; is it the checkpoint of another model?")
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and v.shape != own[k].shape]
    if mismatched:
        raise CheckpointError(f"{_name(source)} does not fit {model} ({len(mismatched)} shape mismatches, is it "
                              f"another model's checkpoint?): " + "; ".join(mismatched[:5]))
    result = module.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing or unexpected:
        message = (f"loading {_name(source)} into {model}: missing {len(missing)} [{_summary(missing)}], "
                   f"unexpected {len(unexpected)} [{_summary(unexpected)}]")
        if strict:
            raise CheckpointError(message)
        log.warning(message)
    log.info("loaded %d tensors from %s into %s", len(state) - len(unexpected), _name(source), model)
    return LoadResult(missing, unexpected)


def _name(source: Source) -> str:
    return "the given state dict" if isinstance(source, Mapping) else str(source)


def _sample(keys: Iterable[str]) -> str:
    return ", ".join(sorted(keys)[:3]) + ", ..."


def _summary(keys: list[str]) -> str:
    """All keys when few, else counts per first component (a foreign sub-model reads as one entry)."""
    if len(keys) <= 6:
        return ", ".join(keys)
    return ", ".join(f"{group}.* ({n})" for group, n in Counter(k.split(".")[0] for k in keys).items())
