"""The CUDA paths, run by `pytest -m gpu` on a GPU machine (benchmarks/gpu_check.py's `tests` part) and
skipped elsewhere: nvJPEG decoding against the CPU readers, pinned-memory loading, an end-to-end run with
bf16 autocast and device decoding, and FSDP2 wrapping on one GPU against plain training."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hipt_e2e.data import SlideBagStream
from hipt_e2e.data.regions import ShardRegions
from hipt_e2e.data.samples import device_pixels
from hipt_e2e.training.e2e import _loader
from tests import processes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def test_nvjpeg_decodes_what_the_cpu_readers_decode(jpeg_shards: Path) -> None:
    """Within JPEG's IDCT tolerance: decoders may round the inverse DCT and colour conversion differently."""
    for lazy, bag in zip(SlideBagStream(jpeg_shards, decode="gpu"), SlideBagStream(jpeg_shards)):
        pixels = device_pixels(lazy["pixels"], CUDA)
        assert pixels.is_cuda and pixels.shape == bag["pixels"].shape
        difference = (pixels.cpu().int() - bag["pixels"].int()).abs()
        assert difference.max() <= 8 and difference.float().mean() < 0.5


def test_training_loader_pins_memory_for_non_blocking_copies(jpeg_shards: Path) -> None:
    regions = ShardRegions(jpeg_shards, regions_per_slide=2, seed=0)
    slide = next(iter(regions.slides))
    item = next(iter(_loader(regions, [regions.sample(slide, 0)], workers=1, device=CUDA)))
    assert item["pixels"].is_pinned()
    on_gpu = device_pixels(item["pixels"], CUDA)
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.cpu(), item["pixels"])


def _e2e(shards: Path, out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    arguments = [f"data.shards={shards}", f"out={out}", "data.regions_per_slide=2", "train.epochs=2",
                 "train.grad_accum=2", "train.log_every=1000", "data.workers=1", *extra]
    return processes.run([sys.executable, str(REPO / "recipes" / "e2e.py"), *arguments], cwd=REPO, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def _probabilities(run: Path) -> dict[tuple[str, str], list[float]]:
    with open(run / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    return {(row["slide_id"], row.get("repeat", "0")): [float(v) for k, v in row.items() if k.startswith("prob_")]
            for row in rows}


def test_end_to_end_on_cuda_with_bf16_and_device_decoding(jpeg_shards: Path, tmp_path: Path) -> None:
    done = _e2e(jpeg_shards, tmp_path / "gpu", "train.mixed_precision=bf16", "data.decode=gpu", "augment.enabled=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bf16 precision" in done.stderr and "JPEG decoded on the gpu" in done.stderr
    probabilities = _probabilities(tmp_path / "gpu")
    assert len(probabilities) == 12
    assert all(abs(sum(p) - 1) < 1e-3 and all(0 <= v <= 1 for v in p) for p in probabilities.values())


def test_fsdp2_on_one_gpu_trains_as_plain_training(jpeg_shards: Path, tmp_path: Path) -> None:
    """One process group of one GPU: FSDP2's reductions are identities, so the run equals the plain one
    up to float rounding (fp32; every step's AdamW update is bounded by lr)."""
    exact = ["train.mixed_precision=no", "optim.lr.tile=1e-4", "optim.lr.region=1e-4", "optim.lr.slide=1e-4"]
    group = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
             "MASTER_PORT": "29533"}
    sharded = _e2e(jpeg_shards, tmp_path / "fsdp", *exact, "train.fsdp=true", env=group)
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    assert "parallelism FSDP" in sharded.stderr
    plain = _e2e(jpeg_shards, tmp_path / "plain", *exact)
    assert plain.returncode == 0, plain.stderr[-3000:]
    a, b = _probabilities(tmp_path / "fsdp"), _probabilities(tmp_path / "plain")
    assert a.keys() == b.keys()
    assert max(abs(x - y) for key in a for x, y in zip(a[key], b[key])) < 1e-3
