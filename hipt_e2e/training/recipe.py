"""The start every recipe shares: command line -> resolved config, logging on the main process."""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from hipt_e2e.config import HelpFormatter, add_config_arguments, resolve_config, setup_logging
from hipt_e2e.data.storage import configure, with_storage_settings


def _lookup(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        node = node[key]
    return node


def recipe_config(defaults: Mapping[str, Any], description: str | None, argv: Sequence[str] | None = None,
                  required: Sequence[str] = ("out",)) -> dict[str, Any]:
    """Parse ``--config FILE key=value ...`` over ``defaults``; the dotted ``required`` keys must be set.

    Only the main process (RANK 0 under ``accelerate launch``) logs below warnings, so a multi-process
    run reads like a single one. A recipe with a data section reads shard sets: it gets the storage
    settings (data.retry_budget_s, data.storage_options), applied here for all its processes.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    reads_shards = "data" in defaults
    cfg = resolve_config(with_storage_settings(defaults) if reads_shards else defaults, args.config, args.overrides)
    missing = [key for key in required if _lookup(cfg, key) is None]
    if missing:
        parser.error(f"set {', '.join(missing)} (in the --config file or as key=value)")
    if reads_shards:
        configure(cfg["data"]["retry_budget_s"], cfg["data"]["storage_options"])
    return cfg
