"""The suite's own machinery. A test that fails or times out ends every process it started: tests/processes.py's
run() on a timeout, and the conftest fixture after a test that failed or timed out with its processes still
running. And on CPython 3.11 two threads may build ASTs at once (conftest's lock around ast.parse)."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.processes import alive, end_tree, popen, run

REPO = Path(__file__).resolve().parents[1]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
# A process that starts one child in its own process group and one in a session of its own (as torchrun
# starts its workers), writes the three pids to argv[1], then sleeps, or with argv[2] == "exit" ends at
# once, leaving both children orphans.
SPAWNER = f"""
import os, subprocess, sys, time
from pathlib import Path
same_group = subprocess.Popen({SLEEPER!r})
own_session = subprocess.Popen({SLEEPER!r}, start_new_session=True)
Path(sys.argv[1] + ".tmp").write_text(f"{{os.getpid()}} {{same_group.pid}} {{own_session.pid}}")
Path(sys.argv[1] + ".tmp").rename(sys.argv[1])
if sys.argv[2] != "exit":
    time.sleep(600)
"""


def spawned(pids_file: Path) -> list[int]:
    """The pids SPAWNER wrote (waiting for them up to 30 s)."""
    for _ in range(300):
        if pids_file.exists():
            return [int(pid) for pid in pids_file.read_text().split()]
        time.sleep(0.1)
    raise TimeoutError(f"{pids_file} was not written")


def test_run_ends_the_whole_tree_on_a_timeout(tmp_path: Path) -> None:
    with pytest.raises(subprocess.TimeoutExpired):
        run([sys.executable, "-c", SPAWNER, str(tmp_path / "pids"), "sleep"], timeout=5)
    pids = spawned(tmp_path / "pids")
    assert len(pids) == 3 and not [pid for pid in pids if alive(pid)]


INNER_TESTS = """
import subprocess, sys, time
from pathlib import Path
import pytest
from tests.test_harness import SPAWNER, spawned
from tests.processes import alive

HERE = Path(__file__).parent


@pytest.mark.timeout(3)
def test_times_out():
    subprocess.Popen([sys.executable, "-c", SPAWNER, str(HERE / "timed_out"), "sleep"])
    spawned(HERE / "timed_out")
    time.sleep(60)


def test_fails_leaving_orphans():
    subprocess.Popen([sys.executable, "-c", SPAWNER, str(HERE / "failed"), "exit"])
    assert not spawned(HERE / "failed")


def test_ends_inside_a_bf16_stage():
    from accelerate import Accelerator

    Accelerator(cpu=True, mixed_precision="bf16")


def test_asks_for_fp32_after_it():
    from accelerate import Accelerator

    assert Accelerator(cpu=True, mixed_precision="no").mixed_precision == "no"


def test_sleeps():
    subprocess.Popen([sys.executable, "-c", SPAWNER, str(HERE / "terminated"), "sleep"])
    time.sleep(60)


def test_the_processes_of_the_tests_before_have_ended():
    pids = spawned(HERE / "timed_out") + spawned(HERE / "failed")
    assert len(pids) == 6 and not [pid for pid in pids if alive(pid)]
"""


def test_a_failed_or_timed_out_test_leaves_no_process(tmp_path: Path) -> None:
    """An inner pytest session with this suite's conftest: a test that times out and one that fails, each
    with a child and grandchildren running (one grandchild in a session of its own; in the second test both
    orphaned); the next test finds all of them ended. And a test that leaves accelerate's state at bf16 does
    not fail the next one that asks for fp32."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import end_processes_the_test_left, fresh_accelerator_state, "
                                          "pytest_configure  # noqa: F401\n")
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    inner = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=native", "-k", "not sleeps",
                 str(tmp_path / "test_inner.py")],
                timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert "2 failed, 3 passed" in inner.stdout, inner.stdout[-3000:] + inner.stderr[-3000:]
    # pytest-timeout 2.1 (the floor) says "Timeout >3.0s", 2.2 on "Timeout (>3.0s) from pytest-timeout."
    assert re.search(r"Timeout \(?>3\.0s", inner.stdout) and "killed 3 processes the test left running" in inner.stdout
    pids = spawned(tmp_path / "timed_out") + spawned(tmp_path / "failed")
    assert not [pid for pid in pids if alive(pid)]


def test_a_terminated_run_reports_and_leaves_no_process(tmp_path: Path) -> None:
    """SIGTERM (a CI job's time limit) during a test: the session ends as after Ctrl-C, with its summary,
    and the test's processes end with it."""
    (tmp_path / "conftest.py").write_text("from tests.conftest import end_processes_the_test_left, pytest_configure, "
                                          "pytest_unconfigure  # noqa: F401\n")
    (tmp_path / "test_inner.py").write_text(INNER_TESTS)
    session = popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "sleeps",
                     str(tmp_path / "test_inner.py")], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        pids = spawned(tmp_path / "terminated")
        session.terminate()
        output, _ = session.communicate(timeout=60)
    finally:
        end_tree(session)
    assert "KeyboardInterrupt" in output and "no tests ran" not in output and " in " in output.splitlines()[-1], output
    assert len(pids) == 3 and not [pid for pid in pids if alive(pid)]


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="the AST constructor's shared state is CPython 3.11's")
def test_two_threads_parse_at_once_with_collections_between() -> None:
    """Without conftest's lock this fails on 3.11.2 and 3.11.7 within a few parses: each thread's garbage
    (cycles whose finalizer releases the GIL) is collected inside its ast.parse, and the other thread runs."""
    class Cycle:
        def __init__(self) -> None:
            self.me = self

        def __del__(self) -> None:
            time.sleep(0)

    source, errors = Path(ast.__file__).read_text(), []

    def parse_many() -> None:
        for _ in range(40):
            garbage = [Cycle() for _ in range(50)]
            del garbage
            try:
                ast.parse(source)
            except SystemError as error:
                errors.append(error)

    threads = [threading.Thread(target=parse_many) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
