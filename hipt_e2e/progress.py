"""Progress: tqdm's bar on a terminal, else a log line every `LOG_EVERY_S` seconds (not megabytes of redraws)."""
from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

log = logging.getLogger("hipt_e2e.progress")

LOG_EVERY_S = 30.0
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed} elapsed, {remaining} left, {rate_fmt}{postfix}]"


class LogLines(tqdm):
    """tqdm whose display is a log line (at most one per `mininterval` seconds)."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=False, **kwargs)  # shown with the next timed line

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg != "":  # tqdm clears a bar that is not left with an empty message: nothing to log
            log.info("%s", msg or self.format_meter(**self.format_dict))
        return True


def progress(iterable: Iterable | None = None, **settings: Any) -> tqdm:
    """tqdm(iterable, **settings) on a terminal, LogLines in a file; `disable` works in both."""
    if settings.get("disable") or sys.stderr.isatty():
        return tqdm(iterable, **settings)
    return LogLines(iterable, **{"mininterval": LOG_EVERY_S, "bar_format": LINE_FORMAT, **settings})
