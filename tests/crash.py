"""Run a recipe and let its process die (os._exit, as a killed process: no cleanup, no atexit) right after
the N-th call of a function, to test what survives. Only on torchrun's first attempt and, with CRASH_RANK
set, only in that rank, so a restarted run goes through.

    python tests/crash.py hipt_e2e.data.writer:UnitShards.add 5 recipes/embed_tiles.py key=value ...
"""
from __future__ import annotations

import functools
import importlib
import os
import runpy
import sys


def die_after(target: str, calls: int) -> None:
    module_name, qualname = target.split(":")
    owner = importlib.import_module(module_name)
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    original, count = getattr(owner, name), [0]

    @functools.wraps(original)
    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        count[0] += 1
        if count[0] == calls:
            sys.stderr.write(f"crash.py: dying after call {calls} of {target}\n")
            sys.stderr.flush()
            os._exit(17)
        return result

    setattr(owner, name, counted)


if __name__ == "__main__":
    target, calls, script, *arguments = sys.argv[1:]
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    chosen = os.environ.get("CRASH_RANK") in (None, os.environ.get("RANK", "0"))
    if first_attempt and chosen:
        die_after(target, int(calls))
    sys.argv = [script, *arguments]
    runpy.run_path(script, run_name="__main__")
