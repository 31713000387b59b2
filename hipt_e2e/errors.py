"""Errors a user can fix, as opposed to bugs, and `run_main`, which prints them as one line `error: ...` and
exits 2 (bugs keep their traceback; `--debug` or HIPT_DEBUG=1 shows it for user errors too). The subclasses
keep the builtin base their raisers had (ValueError, OSError, ...), so callers catching those still do.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

USER_ERROR_EXIT = 2  # argparse's code for a usage error: the same family of mistake
RANK_GRACE_S = 10.0  # how long a rank other than 0 waits for rank 0 to report the same error

# Missing, unreadable or in-the-way files the user named: OSError's own subclasses, with the path in the message.
FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


class UserError(Exception):
    """A mistake or condition the user can fix; its message names the file or key and the fix."""


class InputError(UserError, ValueError):
    """An input (slide, image, tensor file, shard set) that cannot be used, with the file and the reason."""

    def __init__(self, path: object, reason: str | None = None):
        # one argument, the whole message: pickling and DataLoader workers rebuild an exception from its args
        super().__init__(str(path) if reason is None else f"{path}: {reason}")
        self.path, self.reason = str(path), reason


class SettingError(UserError, ValueError):
    """A setting (config value, flag, combination of settings) that is refused."""


class UnknownSettingError(UserError, KeyError):
    """A config key that no default defines: a typo must not pass silently."""

    __str__ = Exception.__str__  # the message as written, without KeyError's quotes


class OtherSettingsError(UserError, FileExistsError):
    """An output folder that holds a shard set, finished or interrupted, made with other settings than this run's."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency that is not installed; the message names the extra to install."""


class StorageError(UserError, OSError):
    """A server or store that refused a read (HTTP 4xx, no range requests), or failed it past the retry budget."""


def take_debug_flag() -> bool:
    """True under HIPT_DEBUG=1 or `--debug`, which it takes from the arguments and passes on as HIPT_DEBUG=1."""
    if "--debug" in sys.argv[1:]:
        sys.argv[1:] = [arg for arg in sys.argv[1:] if arg != "--debug"]
        os.environ["HIPT_DEBUG"] = "1"
    return os.environ.get("HIPT_DEBUG", "") not in ("", "0")


def error_message(error: BaseException) -> str:
    """An OSError from open() as `path: reason`, any other error as its message; one re-raised from a DataLoader
    worker (`Caught X in DataLoader worker process N.` + traceback) as what follows its last `X: ` line."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    text = str(error)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        cls = type(error)
        for name in (f"{cls.__module__}.{cls.__qualname__}: ", f"{cls.__qualname__}: "):
            if (start := text.rfind("\n" + name)) >= 0:
                return text[start + 1 + len(name):].rstrip("\n")
    return text


def report(error: BaseException) -> None:
    """The error line on stderr, once per run: under `accelerate launch` rank 0 says it and the launcher ends the
    others; a rank still alive after RANK_GRACE_S met an error of its own and says it, naming itself (exiting at
    once would let the launcher end rank 0 before it printed)."""
    rank = int(os.environ.get("RANK", "0"))
    if rank != 0:
        time.sleep(RANK_GRACE_S)
    print(f"error: {f'rank {rank}: ' if rank else ''}{error_message(error)}", file=sys.stderr, flush=True)


def run_main(main: Callable[[], Any]) -> int:
    """Run an entry point's `main()`: its exit code (0 for None), or 2 for a user error printed by `report`."""
    debug = take_debug_flag()
    try:
        result = main()
    except (UserError, *FILE_ERRORS) as error:
        if debug:
            raise
        report(error)
        return USER_ERROR_EXIT
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
