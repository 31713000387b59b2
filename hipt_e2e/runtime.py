"""The run's Accelerator, built by one function at a run's entry point before anything asks which process is
main: accelerate's state is a singleton set by whichever object comes first, and a bare `PartialState()`
ignores ACCELERATE_USE_CPU (a CPU run launched as two machines ran as two lone processes).
"""
from __future__ import annotations

from typing import Any, Literal

from accelerate import Accelerator, FullyShardedDataParallelPlugin

Precision = Literal["no", "fp16", "bf16"] | None  # a precision setting; None: as `accelerate launch` says


def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """FSDP2 with the whole HIPT as one unit: finer units would all-gather once per tile chunk, a number that
    differs between processes (a deadlock). One unit still shards optimizer state and gradients. GPUs only:
    Accelerate runs CPU processes with DDP whatever the plugin says."""
    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="no_wrap", reshard_after_forward=True)


def make_accelerator(precision: Precision = "no", *, fsdp: bool = False, **settings: Any) -> Accelerator:
    """The Accelerator of a run (settings: Accelerator's own, e.g. gradient_accumulation_steps, trackers)."""
    return Accelerator(mixed_precision=precision, fsdp_plugin=fsdp_plugin() if fsdp else None, **settings)
