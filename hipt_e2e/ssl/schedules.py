"""Per-iteration DINO schedules (learning rate, weight decay, teacher momentum) and the lr scaling rule."""
from __future__ import annotations

import numpy as np

from hipt_e2e.errors import SettingError

REFERENCE_BATCH = 256  # DINO's base learning rates are quoted for a global batch of 256


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: the quoted lr holds for a batch of 256 and grows with the batch."""
    return base_lr * global_batch / REFERENCE_BATCH


def cosine_schedule(base: float, final: float, epochs: int, iters_per_epoch: int, warmup_epochs: int = 0,
                    start_warmup: float = 0.0) -> np.ndarray:
    """One value per iteration: a linear ramp start_warmup -> base over the warm-up, then a half cosine from
    base to final, sampled at i/n for i < n as DINO's (its last value one step short of ``final``)."""
    total = epochs * iters_per_epoch
    warmup_iters = warmup_epochs * iters_per_epoch
    if not 0 <= warmup_iters <= total:
        raise SettingError(f"warm-up of {warmup_iters} iterations does not fit in {total}")
    warmup = np.linspace(start_warmup, base, warmup_iters)
    progress = np.arange(total - warmup_iters) / max(total - warmup_iters, 1)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([warmup, cosine])


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """One teacher temperature per epoch: linear warmup_temp -> temp, then constant."""
    if not 0 <= warmup_epochs <= epochs:
        raise SettingError(f"teacher temperature warm-up of {warmup_epochs} epochs does not fit in {epochs}")
    return np.concatenate([np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp)])
