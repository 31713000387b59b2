"""The start every recipe shares: command line -> resolved, validated settings, logging on the main process."""
from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from hipt_e2e.config import HelpFormatter, S, add_config_arguments, resolve_settings, setup_logging
from hipt_e2e.data.storage import StorageSettings, configure


def _lookup(cfg: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for key in dotted.split("."):
        node = node[key]
    return node


def _parse(description: str | None, argv: Sequence[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """``--config FILE key=value ...``; only the main process (RANK 0 under ``accelerate launch``) logs below
    warnings, so a multi-process run reads like a single one."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)
    return parser, args


def _require(parser: argparse.ArgumentParser, values: Mapping[str, Any], required: Sequence[str]) -> None:
    missing = [key for key in required if _lookup(values, key) is None]
    if missing:
        parser.error(f"set {', '.join(missing)} (in the --config file or as key=value)")


def recipe_settings(kind: type[S], description: str | None, argv: Sequence[str] | None = None,
                    required: Sequence[str] = ("out",)) -> S:
    """A recipe's typed settings from ``--config FILE key=value ...`` (validated once, here); the dotted
    ``required`` keys must be set. A data section with the storage settings (it reads shard sets) is applied
    here for all the run's processes."""
    parser, args = _parse(description, argv)
    settings = resolve_settings(kind, args.config, args.overrides)
    _require(parser, settings.to_mapping(), required)
    data = getattr(settings, "data", None)
    if isinstance(data, StorageSettings):
        configure(data.retry_budget_s, data.storage_options)
    return settings

