"""Experiment trackers (`train.log_with`) through Accelerate's own: TensorBoard event files, an MLflow file
store in `out/mlruns`, W&B offline in `out/wandb` (unless MLFLOW_TRACKING_URI / WANDB_MODE say otherwise), so
no network call happens unless asked for. Scalars are tagged by fold where there are folds ("fold_0/train/loss").
"""
from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from accelerate import Accelerator

from hipt_e2e.errors import MissingExtraError, SettingError
from hipt_e2e.training.checkpointing import flatten_config

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # train.log_with -> its module
LogWith = Literal["none", "tensorboard", "mlflow", "wandb"]  # a train.log_with setting


def tracker_settings(log_with: str | None, out: str | Path) -> dict[str, Any]:
    """Accelerator(**these) for train.log_with, with the offline defaults set; a clear error naming the
    extra to install when its package is missing."""
    if log_with in (None, "none"):
        return {}
    if log_with not in TRACKERS:
        raise SettingError(f"train.log_with must be none or one of {sorted(TRACKERS)}, got {log_with!r}")
    if importlib.util.find_spec(TRACKERS[log_with]) is None:
        raise MissingExtraError(f"train.log_with={log_with} needs its package: pip install 'hipt-e2e[{log_with}]'")
    out = Path(out).resolve()
    if log_with == "mlflow":
        os.environ.setdefault("MLFLOW_TRACKING_URI", (out / "mlruns").as_uri())
    if log_with == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_DIR", str(out))
    return {"log_with": log_with, "project_dir": str(out)}


def hyperparameters(cfg: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    """The config flattened to the scalar values trackers take (lists and None as text)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten_config(cfg).items()}


def start_tracking(accelerator: Accelerator, run: str, cfg: Mapping[str, Any]) -> None:
    """Open the configured trackers for this run (main process; nothing when train.log_with is none)."""
    if accelerator.log_with:
        accelerator.init_trackers(run, config=hyperparameters(cfg))


def track(accelerator: Accelerator, values: Mapping[str, float], step: int, prefix: str = "") -> None:
    """Scalars at `step`, tagged prefix/name (main process; nothing without trackers)."""
    if accelerator.log_with:
        accelerator.log({f"{prefix}{name}": float(value) for name, value in values.items()}, step=step)


def stop_tracking(accelerator: Accelerator) -> None:
    """Close this run's trackers. Not accelerator.end_training(): that also ends the process group, which
    the stages after this one (ablations run several in one process) still need."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
