"""Shard sets from anywhere, and the index that opens them: local folders, file://, HTTP with Range (a
server on 127.0.0.1 that also drops connections or flips a byte), fsspec's memory://; the index written
with every shard set, checked by verify, rebuilt for shard sets made before it; manifests that name
files outside their shard set refused."""
from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
import torch

from hipt_e2e.data import RegionStream, SlideBagStream, load_manifest, shard_urls, storage
from hipt_e2e.data.index import INDEX, ShardDataError, ShardIndex, open_index
from hipt_e2e.data.regions import RegionCache, ShardRegions
from hipt_e2e.errors import SettingError, UserError
from shards.verify import verify
from tests.http_server import ShardServer
from tests.launch import free_port


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch):
    """Retries in milliseconds, a server back noticed within 0.25 s, no outage left over from another test."""
    monkeypatch.setattr(storage, "BACKOFF_S", 0.001)
    monkeypatch.setattr(storage, "MAX_WAIT_S", 0.25)
    monkeypatch.setattr(storage, "_outages", {})
    for name in (storage.RETRY_BUDGET_ENV, storage.STORAGE_OPTIONS_ENV):
        monkeypatch.setenv(name, "")  # what a test sets (directly or through configure) is undone after it


def copy_set(shards: Path, to: Path) -> Path:
    shutil.copytree(shards, to)
    return to


def bags(source) -> list[dict]:
    regions = ShardRegions(source, regions_per_slide=None, seed=0)
    return [regions[regions.chunks(slide, 100)[0]] for slide in sorted(regions.slides)]


def assert_same_bags(mine: list[dict], theirs: list[dict]) -> None:
    assert len(mine) == len(theirs) > 0
    for a, b in zip(mine, theirs):
        assert a["slide_id"] == b["slide_id"] and torch.equal(a["pixels"], b["pixels"])
        assert torch.equal(a["tissue"], b["tissue"]) and torch.equal(a["coords"], b["coords"])


# ------------------------------------------------------------------------------------------ the index
def test_index_matches_the_tar_headers_and_bytes(shards: Path) -> None:
    manifest = load_manifest(shards)
    index = open_index(manifest)
    assert len(index) == manifest["samples"] and index.shard_sha256.tolist() == [s["sha256"] for s in manifest["shards"]]
    assert set(index.exts.tolist()) == {"png", "json"}
    for position, shard in enumerate(manifest["shards"]):
        with tarfile.open(shards / shard["name"]) as tar:
            members = [m for m in tar if m.isfile()]
            rows = np.flatnonzero(index.shard == position)
            assert len(members) == 2 * len(rows)
            for member in members:
                key, ext = member.name.split(".", 1)
                row = rows[index.key[rows] == key.encode()][0]
                column = index.exts.tolist().index(ext)
                assert (index.offset[row, column], index.size[row, column]) == (member.offset_data, member.size)
                if ext == "json":
                    record = json.loads(tar.extractfile(member).read())
                    assert index.slide_ids[index.slide[row]] == record["slide_id"]
                    assert index.region_index[row] == record["region_index"]
    assert verify(shards) == []


def test_opening_reads_the_manifest_and_the_index_only(shards: Path, monkeypatch) -> None:
    opened = []
    for name in ("read_bytes", "open_stream"):  # what the index module reads
        real = getattr(storage, name)
        monkeypatch.setattr(f"hipt_e2e.data.index.{name}", lambda loc, *a, real=real: opened.append(loc) or real(loc, *a))
    ShardRegions(shards, regions_per_slide=2, seed=0)
    assert [Path(p).name for p in opened] == [INDEX]


def test_a_set_built_before_the_index_is_indexed_on_first_open(shards: Path, tmp_path: Path, caplog) -> None:
    old = copy_set(shards, tmp_path / "old")
    (old / INDEX).unlink()
    with caplog.at_level(logging.INFO):
        assert_same_bags(bags(old), bags(shards))
    assert "no index" in caplog.text and (old / INDEX).read_bytes() == (shards / INDEX).read_bytes()
    assert verify(old) == []
    # An index of other shards (here: one shard rewritten) is noticed and rebuilt, not trusted.
    stale = copy_set(shards, tmp_path / "stale")
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["shards"][0]["sha256"] = "0" * 64
    (stale / "manifest.json").write_text(json.dumps(manifest))
    assert any("describes other shards" in p for p in verify(stale))
    with caplog.at_level(logging.WARNING):
        open_index(load_manifest(stale))
    assert "reindexing" in caplog.text


def test_verify_finds_an_index_that_lies(shards: Path, tmp_path: Path) -> None:
    bad = copy_set(shards, tmp_path / "bad")
    index = ShardIndex.from_bytes((bad / INDEX).read_bytes(), "x")
    index.offset[3, 0] += 512
    index.write(bad)
    problems = verify(bad)
    name = load_manifest(bad)["shards"][index.shard[3]]["name"]
    assert problems == [f"{INDEX}: {name}: differs from the shard's own headers and bytes (first at sample "
                        f"{index.key[3].decode()})"]


def test_merged_parts_have_one_index(e2e_slides: Path, tmp_path: Path) -> None:
    from shards.build import BuildSettings, build
    from shards.merge import merge

    settings = {"kind": "images", "input": str(e2e_slides), "labels": str(e2e_slides / "labels.csv"),
                "out": str(tmp_path / "parts"), "slide_mpp": 0.5, "region_px": 128, "tile_px": 32, "encoding": "png",
                "shard_bytes": 200_000}
    for part in ("0/2", "1/2"):
        build(BuildSettings.from_mapping({**settings, "part": part}))
    merge(tmp_path / "parts")
    whole = build(BuildSettings.from_mapping({**settings, "out": str(tmp_path / "whole")}))
    assert verify(tmp_path / "parts") == [] and len(open_index(load_manifest(tmp_path / "parts"))) == whole["samples"]
    assert_same_bags(sorted(bags(tmp_path / "parts"), key=lambda b: b["slide_id"]), bags(tmp_path / "whole"))


# ------------------------------------------------------------------------------------------ locations
@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "pipe:cat x.tar", "http://elsewhere/x.tar",
                                  "a/../../x.tar", "s3://bucket/x.tar", ""])
def test_manifest_names_outside_the_shard_set_are_refused(shards: Path, tmp_path: Path, name: str) -> None:
    evil = copy_set(shards, tmp_path / "evil")
    manifest = json.loads((evil / "manifest.json").read_text())
    manifest["shards"][0]["name"] = name
    (evil / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="is not a file inside the shard set"):
        shard_urls(evil)
    with pytest.raises(ValueError, match="is not a file inside the shard set"):
        storage.child("http://127.0.0.1:1/set", name)


def test_file_urls_and_fsspec_memory_read_what_the_folder_holds(shards: Path) -> None:
    regions = [r["record"]["region_index"] for r in RegionStream(shards)]
    assert [r["record"]["region_index"] for r in RegionStream(shards.absolute().as_uri())] == regions
    memory = fsspec.filesystem("memory")
    for path in filter(Path.is_file, shards.iterdir()):  # the set's files (units/ holds the writer's records)
        memory.pipe_file(f"/sets/png/{path.name}", path.read_bytes())
    assert [r["record"]["region_index"] for r in RegionStream("memory://sets/png")] == regions
    assert_same_bags(bags("memory://sets/png"), bags(shards))
    with pytest.raises(FileNotFoundError, match="memory://sets/none/manifest.json: no manifest"):
        load_manifest("memory://sets/none")


def test_a_missing_filesystem_names_what_to_install() -> None:
    with pytest.raises(ValueError, match=r"nosuch://bucket/manifest.json: no reader for nosuch://"):
        storage.read_bytes("nosuch://bucket/manifest.json")
    try:
        import s3fs  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"s3://bucket/set/manifest.json: reading s3:// needs pip install 'hipt-e2e\[s3\]'"):
            load_manifest("s3://bucket/set")


# ------------------------------------------------------------------------------------------ HTTP
def test_http_shards_read_as_the_folder_through_dropped_connections(shards: Path) -> None:
    with ShardServer(shards.parent, drop_every=5) as server:
        url = f"{server.url}/{shards.name}"
        assert verify(url) == []
        assert [r["record"]["region_index"] for r in RegionStream(url)] == [
            r["record"]["region_index"] for r in RegionStream(shards)]
        assert [b["slide_id"] for b in SlideBagStream(url)] == [b["slide_id"] for b in SlideBagStream(shards)]
        assert_same_bags(bags(url), bags(shards))
    assert server.dropped >= 4  # both kinds of break (no answer; half a body) were retried


def test_a_ten_second_outage_in_the_middle_of_a_shard_is_waited_out(shards: Path, capsys) -> None:
    from shards.cli import main as hipt_shards

    with ShardServer(shards.parent, outage_at=6, outage_s=10) as server:  # request 6: shard 1's stream
        url = f"{server.url}/{shards.name}"
        assert hipt_shards(["verify", url]) == 0
        back_after = time.monotonic() - server.down_at
    out, err = capsys.readouterr()
    assert out.splitlines()[-1] == f"verify {url}: OK" and server.down_request == f"/{shards.name}/shard-000001.tar"
    # logged once when it began (what it waits for, the budget) and once when it ended, not per retry
    waiting = [line for line in err.splitlines() if "waiting up to" in line]
    assert len(waiting) == 1 and re.search(rf"{url}/shard-000001.tar: Connection(Refused|Reset)Error: ", waiting[0])
    assert f"waiting up to 120 s for {server.url} to answer again (data.retry_budget_s / HIPT_RETRY_BUDGET_S)" in waiting[0]
    down = [float(s) for s in re.findall(r"answering again after ([\d.]+) s down", err)]
    assert len(down) == 1 and 10 <= down[0] < back_after < 12


def test_an_outage_past_the_budget_fails_in_one_line_and_once(shards: Path, monkeypatch) -> None:
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "1")
    with ShardServer(shards.parent, outage_at=4, outage_s=10) as server:  # request 4: shard 1's stream
        url = f"{server.url}/{shards.name}"
        started = time.monotonic()
        with pytest.raises(storage.StorageUnavailableError) as failed:
            list(RegionStream(url))
        assert 1 <= time.monotonic() - started < 2
        # The budget is per outage, not per read: while the server stays down, the next read fails at once.
        started = time.monotonic()
        with pytest.raises(storage.StorageUnavailableError, match=rf"^{url}/manifest.json: unreachable for 1\.\d s, "):
            load_manifest(url)
        assert time.monotonic() - started < 0.5
    assert isinstance(failed.value, UserError) and isinstance(failed.value, OSError)
    assert re.fullmatch(rf"{url}/shard-000001\.tar: unreachable for 1\.\d s, last error: ConnectionRefusedError: "
                        r"\[Errno \d+\] Connection refused; to wait longer than 1 s set data\.retry_budget_s=SECONDS "
                        r"\(or HIPT_RETRY_BUDGET_S=SECONDS\)", str(failed.value))


def test_the_storage_settings_reach_every_process_through_the_environment(monkeypatch) -> None:
    from hipt_e2e.training.e2e import E2ESettings
    from hipt_e2e.training.recipe import recipe_settings

    recipe_settings(E2ESettings, None, ["data.retry_budget_s=300", "data.storage_options.endpoint_url=http://127.0.0.1:9000",
                                        "data.storage_options.anon=true"], required=())
    child = subprocess.run([sys.executable, "-c", "from hipt_e2e.data import storage; "
                            "print(storage.retry_budget_s(), storage.storage_options())"],
                           capture_output=True, text=True, check=True)  # a DataLoader worker, an accelerate rank
    assert child.stdout == "300.0 {'endpoint_url': 'http://127.0.0.1:9000', 'anon': True}\n"
    # Not set in the recipe: what the environment says (a job script's export), else 120 s.
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "45")
    recipe_settings(E2ESettings, None, [], required=())
    assert storage.retry_budget_s() == 45.0
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "")
    assert storage.retry_budget_s() == 120.0
    with pytest.raises(SettingError, match=r"^data.retry_budget_s='soon': the retry budget is a number of seconds"):
        storage.configure("soon")  # what an untyped recipe's data.retry_budget_s=soon meets (a typed one: its type)


def test_a_training_read_fetches_only_its_regions(shards: Path) -> None:
    with ShardServer(shards.parent) as server:
        regions = ShardRegions(f"{server.url}/{shards.name}", regions_per_slide=2, seed=0)
        opened = server.bytes_sent
        slide = sorted(regions.slides)[0]
        regions[regions.sample(slide, 0)]
        total = sum(s["bytes"] for s in load_manifest(shards)["shards"])
        rows = regions.slides[slide][list(regions.sample(slide, 0)[1])]
        members = int(sum(regions.index.size[r][regions.index.size[r] > 0].sum() for r in rows))
        assert server.requests == 2 + 2  # manifest, index; then one range read per region
        # per region its members, and between them one tar header and the first one's padding to 512 bytes
        assert members <= server.bytes_sent - opened <= members + 2 * (512 + 511)
        assert server.bytes_sent - opened < total / 10


def test_a_corrupted_byte_stops_with_the_url_and_the_member(shards: Path) -> None:
    manifest = load_manifest(shards)
    index = open_index(manifest)
    row = 5
    name = manifest["shards"][index.shard[row]]["name"]
    column = index.exts.tolist().index("png")
    flipped = int(index.offset[row, column]) + 100
    with ShardServer(shards.parent, corrupt={f"{shards.name}/{name}": flipped}) as server:
        url = f"{server.url}/{shards.name}"
        regions = ShardRegions(url, regions_per_slide=None, seed=0)
        slide = str(index.slide_ids[index.slide[row]])
        position = int(np.flatnonzero(regions.slides[slide] == row)[0])
        with pytest.raises(ShardDataError, match=rf"{url}/{name}: member {index.key[row].decode()}\.png .* checksum"):
            regions[(slide, (position,))]
        assert any("sha256 differs" in p for p in verify(url))
    with ShardServer(shards.parent) as server:
        with pytest.raises(FileNotFoundError, match=rf"{server.url}/nothing/manifest.json"):
            load_manifest(f"{server.url}/nothing")


def test_the_cache_serves_repeated_reads_and_stays_bounded(shards: Path, tmp_path: Path) -> None:
    with ShardServer(shards.parent) as server:
        url = f"{server.url}/{shards.name}"
        regions = ShardRegions(url, regions_per_slide=None, seed=0, cache_dir=tmp_path / "cache", cache_bytes=10**9)
        keys = [regions.chunks(slide, 100)[0] for slide in sorted(regions.slides)]
        first = [regions[key] for key in keys]
        before = server.requests
        again = [regions[key] for key in keys]
        assert server.requests == before
        assert_same_bags(again, first)
        # A damaged cache entry is fetched again, not trusted.
        entry = next((tmp_path / "cache").glob("*.bin"))
        entry.write_bytes(b"x" + entry.read_bytes()[1:])
        assert_same_bags([regions[key] for key in keys], first) and server.requests == before + 1
    small = RegionCache(tmp_path / "small", max_bytes=3000)
    for n in range(10):
        small.put("u", n, n + 1000, bytes(1000))
    assert sum(p.stat().st_size for p in (tmp_path / "small").glob("*.bin")) <= 3000
    assert small.get("u", 9, 1009) == bytes(1000) and small.get("u", 0, 1000) is None


def test_end_to_end_training_from_a_url_gives_the_local_predictions(shards: Path, tmp_path: Path) -> None:
    from tests.test_e2e import load_recipe, settings

    recipe = load_recipe()
    recipe.main(settings(shards, tmp_path / "local"))
    # dropped connections, and the server down for 10 s in the middle of training (request 30: a region's range read)
    with ShardServer(shards.parent, drop_every=9, outage_at=30, outage_s=10) as server:
        recipe.main(settings(f"{server.url}/{shards.name}", tmp_path / "http", f"data.cache_dir={tmp_path / 'cache'}"))
    assert server.dropped > 0 and server.down_request.endswith(".tar") and any((tmp_path / "cache").glob("*.bin"))
    for name in ("predictions.csv", "fold_0/train_log.jsonl", "fold_2/history.json"):
        assert (tmp_path / "local" / name).read_text() == (tmp_path / "http" / name).read_text(), name


def test_prediction_from_a_url_gives_the_local_predictions(shards: Path, tmp_path: Path) -> None:
    from hipt_e2e.inference.predict import main as predict
    from hipt_e2e.models import HIPT
    from hipt_e2e.training.checkpointing import export_safetensors

    export_safetensors(HIPT.from_preset("tiny", n_classes=2), tmp_path / "hipt.safetensors")
    settings = ["input_kind=shards", "model.preset=tiny", "model.classes=[a, b]",
                f"model.weights={tmp_path / 'hipt.safetensors'}", "top_regions=1"]
    assert predict([str(shards), *settings, f"out={tmp_path / 'local'}"]) == 0
    with ShardServer(shards.parent, drop_every=7) as server:
        url = f"{server.url}/{shards.name}"
        assert predict([url, *settings, f"out={tmp_path / 'http'}"]) == 0
    local, remote = ((tmp_path / run / "predictions.csv").read_text() for run in ("local", "http"))
    assert remote == local.replace(str(shards), url) and len(local.splitlines()) == 13


def test_embedding_from_a_url_writes_the_local_shards(shards: Path, tmp_path: Path) -> None:
    from hipt_e2e.models import model_preset, vit256
    from hipt_e2e.training.checkpointing import export_safetensors
    from tests.test_dino_recipes import run_recipe

    torch.manual_seed(0)
    export_safetensors(vit256(**model_preset("tiny")["tile"]), tmp_path / "tile.safetensors")
    run_recipe("embed_tiles", f"data.shards={shards}", f"model.weights={tmp_path / 'tile.safetensors'}",
               f"out={tmp_path / 'local'}")
    with ShardServer(shards.parent, drop_every=6) as server:
        run_recipe("embed_tiles", f"data.shards={server.url}/{shards.name}",
                   f"model.weights={tmp_path / 'tile.safetensors'}", f"out={tmp_path / 'http'}")
    local = sorted((tmp_path / "local").glob("shard-*.tar"))
    assert len(local) > 1 and [p.read_bytes() for p in local] == [
        p.read_bytes() for p in sorted((tmp_path / "http").glob("shard-*.tar"))]
    assert (tmp_path / "local" / INDEX).read_bytes() == (tmp_path / "http" / INDEX).read_bytes()


# ------------------------------------------------------------------------------------------ S3 servers other than AWS
@pytest.fixture(scope="module")
def s3_server() -> Iterator[tuple[Any, str]]:
    """A local S3 server (moto's server mode), as MinIO or Ceph would be, and its URL."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[s3]')")
    moto_server = pytest.importorskip("moto.server", reason="moto's server is not installed (pip install -e '.[dev]')")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield server, f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_endpoint(s3_server: tuple[Any, str]) -> str:
    return s3_server[1]


@pytest.fixture
def s3_shards(shards: Path, s3_endpoint: str, monkeypatch) -> str:
    """The shard set in a bucket of the local server; credentials in the environment, as for any S3 server."""
    import s3fs

    for name, value in {"AWS_ACCESS_KEY_ID": "hipt", "AWS_SECRET_ACCESS_KEY": "hipt-secret", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    s3fs.S3FileSystem.clear_instance_cache()  # clients made under other settings (endpoint, proxy, retries)
    bucket = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    if not bucket.exists("cohort"):
        bucket.mkdir("cohort")
    for path in filter(Path.is_file, shards.iterdir()):  # the set's files (units/ holds the writer's records)
        bucket.pipe_file(f"cohort/png/{path.name}", path.read_bytes())
    return "s3://cohort/png"


def test_a_shard_set_on_an_s3_server_of_ones_own_reads_as_the_folder(shards: Path, s3_shards: str, s3_endpoint: str,
                                                                     monkeypatch, capsys) -> None:
    from hipt_e2e.training.e2e import E2ESettings
    from hipt_e2e.training.recipe import recipe_settings
    from shards.cli import main as hipt_shards

    assert hipt_shards(["verify", s3_shards, "--storage-option", f"endpoint_url={s3_endpoint}"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"verify {s3_shards}: OK"
    monkeypatch.setenv(storage.STORAGE_OPTIONS_ENV, "")  # the recipe's setting alone, below
    recipe_settings(E2ESettings, None, [f"data.shards={s3_shards}", f"data.storage_options.endpoint_url={s3_endpoint}"], required=())
    assert [r["record"]["region_index"] for r in RegionStream(s3_shards)] == [
        r["record"]["region_index"] for r in RegionStream(shards)]
    assert_same_bags(bags(s3_shards), bags(shards))


def test_without_its_endpoint_an_s3_read_fails_in_one_line_that_names_it(s3_shards: str, monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")  # AWS unreachable wherever the test runs: a refusing proxy
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: the budget alone decides
    monkeypatch.setenv(storage.RETRY_BUDGET_ENV, "0")
    with pytest.raises(storage.StorageUnavailableError) as failed:
        load_manifest(s3_shards)
    assert re.fullmatch(rf"{s3_shards}/manifest\.json: unreachable for 0\.0 s, last error: ProxyConnectionError: .*; to wait "
                        r"longer than 0 s set data\.retry_budget_s=SECONDS \(or HIPT_RETRY_BUDGET_S=SECONDS\); an S3 server "
                        r"other than AWS's needs its endpoint: data\.storage_options\.endpoint_url=URL \(hipt-shards: "
                        r"--storage-option endpoint_url=URL\) or AWS_ENDPOINT_URL=URL", str(failed.value))


def test_an_s3_server_restarting_during_a_read_is_waited_out(shards: Path, s3_shards: str, s3_server: tuple[Any, str],
                                                            monkeypatch, caplog) -> None:
    import s3fs

    server, endpoint = s3_server
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own retries off: the budget alone waits
    s3fs.S3FileSystem.clear_instance_cache()
    storage.configure(storage_options={"endpoint_url": endpoint})
    read: list[int] = []
    with caplog.at_level(logging.WARNING, logger="hipt_e2e.data.storage"):
        for region in RegionStream(s3_shards):
            read.append(region["record"]["region_index"])
            if len(read) == 3:  # shard 0 is read; the next ones are opened while the server is down
                server.stop()
                server._server.server_close()  # stop() leaves its socket listening: connections would hang, not fail
                restart = threading.Timer(3.0, server.start)
                restart.start()
        restart.join()
    assert read == [r["record"]["region_index"] for r in RegionStream(shards)]
    assert len([m for m in caplog.messages if "waiting up to 120 s" in m and "EndpointConnectionError" in m]) == 1
    down = [float(s) for m in caplog.messages for s in re.findall(r"answering again after ([\d.]+) s down", m)]
    assert len(down) == 1 and 3 <= down[0] < 5
