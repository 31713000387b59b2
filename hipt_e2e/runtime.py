"""The run's Accelerator: built by one function, at a run's entry point, before anything asks which process
is main.

accelerate keeps the process's distributed state in a singleton, and whichever object creates it first
decides how many processes the run has: a bare `PartialState()` does not read ACCELERATE_USE_CPU, so a CPU
run launched as two machines, where it came first, ran as two lone processes ("process 0 of 1" on both)
beside a live process group. Entry points build the Accelerator here and pass it on; library functions
given none build theirs here too, first thing.
"""
from __future__ import annotations

from typing import Any, Literal

from accelerate import Accelerator, FullyShardedDataParallelPlugin

from hipt_e2e.errors import SettingError

PRECISIONS = ("no", "fp16", "bf16")
Precision = Literal["no", "fp16", "bf16"] | None  # a precision setting; None: as `accelerate launch` says


def mixed_precision(value: str | bool | None) -> str | None:
    """A precision setting as accelerate takes it: false (YAML 1.1 tools write a bare `no` so) is "no"; None
    leaves it to `accelerate launch --mixed_precision` (its environment), fp32 without one."""
    if value is False:
        return "no"
    if value is not None and value not in PRECISIONS:
        raise SettingError(f"mixed precision must be one of {list(PRECISIONS)} or null, got {value!r}")
    return value


def fsdp_plugin() -> FullyShardedDataParallelPlugin:
    """FSDP2 with the whole HIPT as one unit. Finer units would all-gather once per call, and the tile
    encoder is called once per chunk of a slide's tiles - a number that differs between processes
    (slide sizes, skipped tiles), which would deadlock the collectives. One unit still shards the
    optimizer state and gradients (most of the memory besides activations, which checkpointing bounds).
    It takes effect on GPUs: Accelerate runs CPU processes with DDP whatever the plugin says."""
    return FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="no_wrap", reshard_after_forward=True)


def make_accelerator(precision: str | bool | None = "no", *, fsdp: bool = False, **settings: Any) -> Accelerator:
    """The Accelerator of a run (settings: Accelerator's own, e.g. gradient_accumulation_steps, trackers)."""
    return Accelerator(mixed_precision=mixed_precision(precision), fsdp_plugin=fsdp_plugin() if fsdp else None,
                       **settings)
