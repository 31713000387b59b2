"""Streaming readers: exactly once across ranks x workers, slide bags across shards, sampling, balance."""
from __future__ import annotations

import io
import itertools
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from hipt_e2e.data import RegionStream, SlideBagStream, TileStream, load_manifest
from hipt_e2e.data.manifest import shard_urls
from hipt_e2e.data.samples import (
    JpegBatch,
    collate,
    decode_mode,
    decode_pixels,
    device_pixels,
    encode_pixels,
    stack_pixels,
)
from shards.build import BuildSettings, build


@pytest.fixture(scope="module")
def shard_dir(synthetic_slides, tmp_path_factory) -> Path:
    """8 slides x 16 regions in many small shards, so that slides span shard boundaries."""
    out = tmp_path_factory.mktemp("stream_shards")
    manifest = build(BuildSettings.from_mapping({"kind": "images", "input": str(synthetic_slides), "out": str(out),
                                                 "labels_from_folders": True, "slide_mpp": 0.5, "region_px": 64, "tile_px": 32,
                                                 "encoding": "png", "shard_bytes": 25_000}))
    assert sum(shard["slide_continues"] for shard in manifest["shards"]) >= 3
    return out


def read_all(make_stream, world_size: int = 2, workers: int = 2) -> list:
    items = []
    for rank in range(world_size):
        stream = make_stream(rank, world_size)
        items += list(DataLoader(stream, batch_size=None, num_workers=workers))
    return items


@pytest.mark.parametrize("shuffle", [0, 20])
def test_regions_exactly_once_over_ranks_and_workers(shard_dir, shuffle):
    manifest = load_manifest(shard_dir)
    regions = read_all(lambda r, w: RegionStream(shard_dir, rank=r, world_size=w, shuffle=shuffle, seed=1))
    keys = [(x["record"]["slide_id"], x["record"]["region_index"]) for x in regions]
    assert len(keys) == len(set(keys)) == manifest["samples"]


def test_tiles_exactly_once_and_tissue_filter(shard_dir):
    tiles = read_all(lambda r, w: TileStream(shard_dir, rank=r, world_size=w, shuffle=50))
    keys = [(t["record"]["slide_id"], t["record"]["region_index"], t["record"]["tile_index"]) for t in tiles]
    assert len(keys) == len(set(keys)) == load_manifest(shard_dir)["samples"] * 4
    assert tiles[0]["pixels"].shape == (3, 32, 32)
    tissue = [t for t in tiles if t["record"]["tissue_fraction"] >= 0.5]
    filtered = read_all(lambda r, w: TileStream(shard_dir, rank=r, world_size=w, min_tissue=0.5))
    assert 0 < len(filtered) == len(tissue) < len(tiles)


def test_tile_order_is_raster(shard_dir):
    region = next(iter(RegionStream(shard_dir)))
    tiles = list(itertools.islice(TileStream(shard_dir), 4))
    for tile in tiles:
        row, col = tile["record"]["row"], tile["record"]["col"]
        assert tile["record"]["tile_index"] == row * 2 + col
        assert (tile["pixels"] == region["pixels"][:, row * 32:(row + 1) * 32, col * 32:(col + 1) * 32]).all()


def test_slide_bags_whole_and_exactly_once(shard_dir):
    manifest = load_manifest(shard_dir)
    bags = read_all(lambda r, w: SlideBagStream(shard_dir, rank=r, world_size=w, shuffle=3, seed=2))
    assert sorted(b["slide_id"] for b in bags) == sorted(manifest["slides"])
    for bag in bags:
        count = manifest["slides"][bag["slide_id"]]["regions"]
        assert bag["region_index"].tolist() == list(range(count))
        assert bag["pixels"].shape == (count, 3, 64, 64) and bag["tissue"].shape == (count, 2, 2)
        assert bag["label"] == manifest["slides"][bag["slide_id"]]["label"]


def test_region_sampling_is_seeded(shard_dir):
    def draw(seed: int, epoch: int) -> dict[str, list[int]]:
        stream = SlideBagStream(shard_dir, regions_per_slide=5, seed=seed)
        stream.set_epoch(epoch)
        return {bag["slide_id"]: bag["region_index"].tolist() for bag in stream}

    first = draw(0, 0)
    assert all(len(indices) == 5 and indices == sorted(set(indices)) for indices in first.values())
    assert draw(0, 0) == first
    assert draw(0, 1) != first and draw(1, 0) != first


def test_balanced_resampling_equalises_classes(synthetic_slides, tmp_path):
    labels = tmp_path / "labels.csv"
    rows = ["slide_id,label"] + [f"class_a_00{n},major" for n in range(4)] + \
        [f"class_b_00{n},major" for n in range(3)] + ["class_b_003,minor"]
    labels.write_text("\n".join(rows) + "\n")
    build(BuildSettings.from_mapping({"kind": "images", "input": str(synthetic_slides), "out": str(tmp_path / "s"), "labels": str(labels),
                                      "slide_mpp": 0.5, "region_px": 64, "tile_px": 32, "shard_bytes": 25_000}))
    plain = Counter(r["record"]["label"] for r in RegionStream(tmp_path / "s"))
    assert plain["major"] == 7 * plain["minor"]
    drawn = Counter(r["record"]["label"] for r in itertools.islice(RegionStream(tmp_path / "s", balanced=True), 600))
    assert abs(drawn["minor"] / 600 - 0.5) < 0.08
    bags = Counter(b["label"] for b in itertools.islice(SlideBagStream(tmp_path / "s", balanced=True), 200))
    assert abs(bags["minor"] / 200 - 0.5) < 0.12


def test_streams_read_urls(shard_dir):
    """An explicit list of shard URLs (here file://) reads the same samples as the folder."""
    urls = [path.absolute().as_uri() for path in sorted(shard_dir.glob("shard-*.tar"))]
    from_urls = [r["record"]["region_index"] for r in RegionStream(urls)]
    from_dir = [r["record"]["region_index"] for r in RegionStream(shard_dir)]
    assert from_urls == from_dir and len(from_dir) == load_manifest(shard_dir)["samples"]


# ---------------------------------------------------------------- decoding on the device (data.decode=gpu)

def test_decode_gpu_falls_back_to_the_cpu_readers_without_cuda(caplog):
    with caplog.at_level(logging.WARNING):
        assert decode_mode("gpu", torch.device("cpu")) == "cpu"
    assert "data.decode=gpu but the device is cpu" in caplog.text
    assert decode_mode("cpu", torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="data.decode='nvjpeg'"):
        decode_mode("nvjpeg", torch.device("cpu"))


def test_deferred_jpeg_regions_decode_to_the_readers_pixels(jpeg_shards, shards):
    """What decode=gpu hands on (JPEG bytes, batched) decodes in one call to what the CPU readers give; the
    CPU run of that call is torchvision's libjpeg-turbo, the device's is nvJPEG (tests/test_gpu.py)."""
    deferred = list(SlideBagStream(jpeg_shards, decode="gpu"))
    decoded = list(SlideBagStream(jpeg_shards))
    assert [bag["slide_id"] for bag in deferred] == [bag["slide_id"] for bag in decoded]
    for lazy, bag in zip(deferred, decoded):
        assert isinstance(lazy["pixels"], JpegBatch) and len(lazy["pixels"]) == len(bag["pixels"]) == 4
        pixels = device_pixels(lazy["pixels"], torch.device("cpu"))
        assert pixels.dtype == torch.uint8 and pixels.shape == bag["pixels"].shape == (4, 3, 128, 128)
        assert torch.equal(pixels, bag["pixels"])  # the same libjpeg-turbo decoder on the CPU
        assert torch.equal(lazy["tissue"], bag["tissue"]) and torch.equal(lazy["coords"], bag["coords"])
    # regions across slides batch into one JpegBatch (DataLoader collate); lossless entries stay decoded
    batch = collate([{"pixels": bag["pixels"]} for bag in deferred[:3]])["pixels"]
    assert isinstance(batch, JpegBatch) and len(batch) == 12
    assert torch.equal(device_pixels(batch, torch.device("cpu")),
                       torch.cat([device_pixels(bag["pixels"], torch.device("cpu")) for bag in deferred[:3]]))
    png = next(iter(SlideBagStream(shards, decode="gpu")))["pixels"]
    assert isinstance(png, torch.Tensor) and png.shape == (4, 3, 128, 128)


def test_jpeg_readers_decode_exactly_as_pillow(jpeg_shards):
    """The readers' JPEG decoder (torchvision's, faster) gives Pillow's pixels bit for bit."""
    for sample in wds.tariterators.tarfile_samples([{"url": url} for url in shard_urls(jpeg_shards)]):
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            expected = torch.from_numpy(np.asarray(image.convert("RGB")).transpose(2, 0, 1).copy())
        assert torch.equal(decode_pixels("jpg", sample["jpg"]), expected)


def test_deferred_jpeg_sizes_are_checked():
    one = decode_pixels("jpg", encode_pixels(np.zeros((32, 64, 3), np.uint8), "jpeg")[1],
                        {"height": 32, "width": 64}, decode="gpu")
    other = decode_pixels("jpg", encode_pixels(np.zeros((64, 64, 3), np.uint8), "jpeg")[1],
                          {"height": 64, "width": 64}, decode="gpu")
    with pytest.raises(ValueError, match=r"differ in size \[\(3, 32, 64\), \(3, 64, 64\)\]"):
        stack_pixels([one, other])
    lying = JpegBatch(one.data, (3, 64, 64))  # a record that does not match its pixels
    with pytest.raises(ValueError, match=r"decoded JPEG regions of size \[\(3, 32, 64\)\], their records say"):
        device_pixels(lying, torch.device("cpu"))
