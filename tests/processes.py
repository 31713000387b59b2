"""Ending the processes a test started, whatever session or group they moved to.

Recipes start processes of their own (accelerate launch -> torchrun, whose workers each get a new session;
DataLoader workers; recipes/lymphoma.py's steps), so killing the one process a test started, or its process
group, can leave the rest running and holding the CPU for later tests. These helpers find a process's
whole tree and group from /proc (Linux) and kill them frozen.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

PROC = Path("/proc")


def _processes() -> list[tuple[int, int, int]]:
    """(pid, parent pid, process group) of every live process (zombies left out), from /proc/<pid>/stat."""
    found = []
    for entry in PROC.iterdir() if PROC.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it ended while we listed
            continue
        # the command name (field 2) may hold spaces and parentheses: state, parent and group follow its last ')'
        state, parent, group = stat[stat.rindex(")") + 2:].split()[:3]
        if state not in ("Z", "X"):
            found.append((int(entry.name), int(parent), int(group)))
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped, does not)."""
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] not in "ZX"


def descendants(root: int, keep: Iterable[int] = ()) -> set[int]:
    """The live processes under `root` (children, theirs, ...), not entering the trees of the pids in `keep`."""
    children: dict[int, list[int]] = defaultdict(list)
    for pid, parent, _ in _processes():
        children[parent].append(pid)
    keep = set(keep)
    found: set[int] = set()
    todo = [root]
    while todo:
        for child in children[todo.pop()]:
            if child not in found and child not in keep:
                found.add(child)
                todo.append(child)
    return found


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def end_processes(find: Callable[[], set[int]]) -> set[int]:
    """Kill every process `find` lists: each is stopped (SIGSTOP) as found, until a listing finds no new one,
    so none can start another between the listing and the kill; then all get SIGKILL, and are waited for
    (up to 10 s). Returns their pids."""
    stopped: set[int] = set()
    while new := find() - stopped:
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        stopped |= new
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously: wait until each has died
    while any(alive(pid) for pid in stopped) and time.monotonic() < deadline:
        time.sleep(0.01)
    return stopped


def end_and_reap(find: Callable[[], set[int]]) -> set[int]:
    """end_processes(find), then reap those that were this process's children (orphans it adopted among
    them, see tests/conftest.py), so that none stays a zombie. Returns their pids."""
    ended = end_processes(find)
    for pid in ended:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # not a child of this process
            pass
    return ended


def group(pgid: int) -> set[int]:
    """The live processes of process group `pgid`."""
    return {pid for pid, _, member_of in _processes() if member_of == pgid}


def end_tree(process: subprocess.Popen) -> None:
    """End `process` (started with start_new_session=True), every process under it and every process left in
    its group (orphans of processes that ended; a group's id is not reused while it has members)."""
    if process.poll() is None:  # not reaped yet, so the pid is still this process's (an ended one's may be reused)
        end_processes(lambda: descendants(process.pid) | {process.pid} | group(process.pid))
    else:
        end_processes(lambda: group(process.pid))
    process.wait()


def popen(command: Sequence[str], **kwargs) -> subprocess.Popen:
    """subprocess.Popen in a session of its own (so end_tree can kill its group), text mode."""
    return subprocess.Popen(command, start_new_session=True, text=True, **kwargs)


def run(command: Sequence[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True) in a session of its own; on a timeout, an
    error or an interrupt (pytest-timeout's) the command and every process under it are ended."""
    process = popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        end_tree(process)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
