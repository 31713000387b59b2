"""Shared fixtures: the real lymphoma images (skipped cleanly when absent) and generated data."""
from __future__ import annotations

import ast
import ctypes
import functools
import gc
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path


def _threads_per_worker() -> None:
    """Under pytest-xdist (`-n N`), each worker and the processes its tests start use cores/N threads:
    N workers of all the cores' OpenMP threads each spin against each other (a test took 5x its time beside
    another process). Set before numpy and torch read them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ.setdefault(name, threads)


_threads_per_worker()

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from tests.processes import PROC, descendants, end_and_reap  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LYMPHOMA = REPO.parent / "shared" / "data" / "lymphoma-iicbu2008"
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
# helpers multiprocessing starts once and shares between tests
MULTIPROCESSING_SERVICES = (b"multiprocessing.resource_tracker", b"multiprocessing.forkserver")


def _one_ast_parse_at_a_time() -> None:
    """CPython 3.11 (3.11.2, Debian 12's python3, and 3.11.7 here; not 3.10 or 3.12) keeps the AST
    constructor's recursion depth in interpreter-wide state, so two threads in ast.parse at once (a garbage
    collection in one lets the other run) fail with "SystemError: AST constructor recursion depth mismatch".
    pytest formatting a failure while a test server's thread formats a traceback (3.11's traceback module
    parses each line it underlines) is two such threads, and the SystemError ended a run with INTERNALERROR
    and no summary. One lock around ast.parse keeps them apart (--tb=native, in pyproject.toml, already
    keeps pytest from parsing whole files)."""
    parse, lock = ast.parse, [threading.RLock()]
    os.register_at_fork(after_in_child=lambda: lock.__setitem__(0, threading.RLock()))  # a forked holder's copy

    @functools.wraps(parse)
    def serialised(*args, **kwargs):
        with lock[0]:
            return parse(*args, **kwargs)

    ast.parse = serialised


if sys.version_info[:2] == (3, 11):
    _one_ast_parse_at_a_time()


def pytest_configure(config) -> None:
    """Orphans (a torchrun worker whose launcher was killed: each worker has a session of its own) are
    re-parented to this process instead of init, so the fixture below still finds them under it; SIGTERM
    (a CI job's time limit, `timeout`) ends the run as Ctrl-C does: fixtures torn down, summary printed."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_unconfigure(config) -> None:
    """Whatever still runs under the session when it ends, interrupted or not, is ended."""
    end_and_reap(lambda: descendants(os.getpid()))


def _is_service(pid: int) -> bool:
    try:
        command = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return False
    return any(name in command for name in MULTIPROCESSING_SERVICES)


@pytest.fixture(autouse=True)
def end_processes_the_test_left():
    """After each test (passed, failed or timed out), end every process started under it and still alive:
    a launcher's workers, DataLoader workers, a recipe's steps. Processes that session or module fixtures
    started before the test (servers) and multiprocessing's shared helpers are kept."""
    keep = descendants(os.getpid())
    yield

    def left() -> set[int]:
        return {pid for pid in descendants(os.getpid(), keep) if not _is_service(pid)}

    if not left():
        return
    # a failed test's frames (kept for post-mortem) hold DataLoader iterators: collected, they end their own workers
    sys.last_type = sys.last_value = sys.last_traceback = sys.last_exc = None
    gc.collect()
    time.sleep(0.5)
    if ended := end_and_reap(left):
        warnings.warn(f"killed {len(ended)} processes the test left running: {sorted(ended)}", stacklevel=1)


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one AcceleratorState per process and refuses an Accelerator of another precision: a
    test that ends inside a bf16 stage (a timeout) would fail every later test that asks for fp32."""
    yield
    if "accelerate.state" in sys.modules:
        sys.modules["accelerate.state"].AcceleratorState._reset_state()


@pytest.fixture(scope="session")
def lymphoma_dir() -> Path:
    if not (LYMPHOMA / "CLL").is_dir():
        pytest.skip(f"real lymphoma images not found at {LYMPHOMA}")
    return LYMPHOMA


def lymphoma_images(root: Path, per_class: int) -> list[Path]:
    return [p for cls in ("CLL", "FL", "MCL")
            for p in sorted((root / cls).glob("*.png"), key=lambda q: int(q.stem))[:per_class]]


def read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.array(image.convert("RGB"))


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory) -> Path:
    from hipt_e2e.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synthetic"), slides_per_class=4, size=256, region_px=64)


@pytest.fixture(scope="session")
def e2e_slides(tmp_path_factory) -> Path:
    """12 synthetic slides of 256 px (3 patients per class, so 3 folds); the right-hand regions of 128 px
    are half glass, so their tiles' tissue fractions differ."""
    from hipt_e2e.data.synthetic import make_dataset

    return make_dataset(tmp_path_factory.mktemp("e2e") / "slides", slides_per_class=6, size=256, region_px=128)


def _build_shards(slides: Path, out: Path, encoding: str) -> Path:
    from shards.build import BuildSettings, build

    build(BuildSettings.from_mapping({"kind": "images", "input": str(slides), "labels": str(slides / "labels.csv"), "out": str(out),
                                      "slide_mpp": 0.5, "region_px": 128, "tile_px": 32, "encoding": encoding, "shard_bytes": 200_000}))
    return out


@pytest.fixture(scope="session")
def shards(e2e_slides, tmp_path_factory) -> Path:
    """e2e_slides as PNG shards: 4 regions of 128 px = 4 x 4 tiles of 32 px per slide."""
    return _build_shards(e2e_slides, tmp_path_factory.mktemp("png") / "shards", "png")


@pytest.fixture(scope="session")
def jpeg_shards(e2e_slides, tmp_path_factory) -> Path:
    """The same slides as JPEG q95 shards (the encoding GPU decoding applies to)."""
    return _build_shards(e2e_slides, tmp_path_factory.mktemp("jpeg") / "shards", "jpeg")
