"""hipt-shards build / verify / merge and the bad-input rules, on real and generated data."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from hipt_e2e.data.embeddings import SlideBag, write_slide_bags
from hipt_e2e.data.samples import decode_sample
from hipt_e2e.data.tiling import pad_region
from hipt_e2e.data.writer import OLD_JOURNAL, UNITS
from hipt_e2e.errors import UnknownSettingError, UserError
from shards.build import BuildError, BuildSettings, build
from shards.cli import main as cli
from shards.inputs import LabelsError, discover
from shards.verify import verify
from tests.conftest import lymphoma_images, read_rgb


def samples_of(out: Path) -> list[tuple[np.ndarray, dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    decoded = [decode_sample(s) for shard in manifest["shards"]
               for s in wds.tariterators.tarfile_samples([{"url": str(out / shard["name"])}])]
    return [(rgb.permute(1, 2, 0).numpy(), record) for rgb, record in decoded]


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


@pytest.fixture(scope="module")
def real_images(lymphoma_dir, tmp_path_factory) -> Path:
    """Links to 3 real images per class, labelled by folder."""
    root = tmp_path_factory.mktemp("real")
    for path in lymphoma_images(lymphoma_dir, 3):
        (root / path.parent.name).mkdir(exist_ok=True)
        (root / path.parent.name / f"{path.parent.name}_{path.name}").symlink_to(path)
    return root


IMAGE_ARGS = dict(kind="images", labels_from_folders=True, slide_mpp=0.5, mpp=0.5, region_px=128, tile_px=32,
                  min_tissue=0.0)


# JPEG floor in dB per quality. These fields were downscaled to 30 %, so they are far noisier than
# 20x scans: libjpeg at quality 95 (4:4:4) gives 36.7-38.0 dB on them; quality 97 clears 40 dB.
JPEG_MIN_PSNR = {95: 36.0, 97: 40.0}


@pytest.mark.parametrize("encoding,quality", [("png", 95), ("npy", 95), ("jpeg", 95), ("jpeg", 97)])
def test_real_images_round_trip(real_images, tmp_path, encoding, quality):
    out = tmp_path / encoding
    manifest = build(BuildSettings.from_mapping({**IMAGE_ARGS, "input": str(real_images), "out": str(out), "encoding": encoding,
                                                 "quality": quality}))
    assert manifest["inputs"] == manifest["written"] == 9 and manifest["classes"] == ["CLL", "FL", "MCL"]
    samples = samples_of(out)
    # 417 x 312 px -> a 4 x 3 grid of 128 px regions, edges padded with white
    assert len(samples) == 9 * 12 == manifest["samples"]
    psnrs = []
    for rgb, record in samples:
        original = read_rgb(Path(record["source"]))
        expected = pad_region(original[record["y"]: record["y"] + 128, record["x"]: record["x"] + 128], 128, 128)
        assert record["grid"] == [4, 4] and len(record["tissue"]) == 16
        if encoding == "jpeg":
            psnrs.append(psnr(rgb, expected))
        else:
            np.testing.assert_array_equal(rgb, expected)
    if encoding == "jpeg":
        assert min(psnrs) >= JPEG_MIN_PSNR[quality], f"jpeg q{quality}: worst region {min(psnrs):.1f} dB"
    assert verify(out) == []


def test_resize_to_target_mpp(real_images, tmp_path):
    """Images at 0.5 um/px cut at 1.0 um/px: each 128 px region covers 256 level-0 px."""
    build(BuildSettings.from_mapping({**IMAGE_ARGS, "input": str(real_images), "out": str(tmp_path), "mpp": 1.0, "encoding": "png"}))
    rgb, record = samples_of(tmp_path)[0]
    assert record["size"] == 256 and rgb.shape == (128, 128, 3)
    original = read_rgb(Path(record["source"]))[:256, :256]
    halved = original.reshape(128, 2, 128, 2, 3).mean(axis=(1, 3))
    assert np.abs(rgb.astype(float) - halved).max() <= 1.0  # a 2x2 area average, up to rounding


def _write_pt_slides(root: Path, rng: np.random.Generator) -> None:
    for slide in range(3):
        folder = root / f"slide{slide}"
        folder.mkdir(parents=True)
        for region in range(2):
            pixels = torch.from_numpy(rng.integers(0, 256, (3, 64, 64), dtype=np.uint8))
            if region % 2:  # the lab stores some regions as float 0-1
                pixels = pixels.float() / 255
            torch.save(pixels, folder / f"region_{region * 64}_{slide * 64}.pt")


def test_pt_slides_uint8_and_float(tmp_path):
    _write_pt_slides(tmp_path / "in", np.random.default_rng(0))
    build(BuildSettings.from_mapping({"kind": "pt", "input": str(tmp_path / "in"), "out": str(tmp_path / "out"), "tile_px": 32,
                                      "encoding": "png"}))
    samples = samples_of(tmp_path / "out")
    assert len(samples) == 6
    for rgb, record in samples:
        source = torch.load(record["source"], weights_only=True)
        expected = source if source.dtype == torch.uint8 else torch.round(source * 255).to(torch.uint8)
        np.testing.assert_array_equal(rgb, expected.permute(1, 2, 0).numpy())
        assert record["grid"] == [2, 2] and record["x"] == record["region_index"] * 64


class Unsafe:
    """Saving an instance pickles a class: weights_only loading must refuse it."""


BAD_PT = {
    "int64.pt": lambda: torch.zeros(3, 32, 32, dtype=torch.int64),
    "range.pt": lambda: torch.full((3, 32, 32), 1.5),
    "nan.pt": lambda: torch.full((3, 32, 32), float("nan")),
    "shape.pt": lambda: torch.zeros(4, 32, 32, dtype=torch.uint8),
    "dict.pt": lambda: {"x": torch.zeros(3, 32, 32)},
    "pickle.pt": lambda: Unsafe(),
    "tiles.pt": lambda: torch.zeros(3, 40, 40, dtype=torch.uint8),  # not whole 32 px tiles
}
REASONS = {"int64.pt": "dtype", "range.pt": "range 0-1", "nan.pt": "NaN", "shape.pt": "shape",
           "dict.pt": "dict", "pickle.pt": "pickled Python objects; refused", "tiles.pt": "tiles",
           "empty.pt": "not a readable tensor file"}


@pytest.fixture()
def bad_tiles(tmp_path) -> Path:
    root = tmp_path / "tiles"
    root.mkdir()
    for n in range(5):
        torch.save(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8), root / f"good{n}.pt")
    for name, make in BAD_PT.items():
        torch.save(make(), root / name)
    (root / "empty.pt").write_bytes(b"")
    return root


def test_bad_pt_files_fail_naming_the_file(bad_tiles, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(BuildError, match=r"dict\.pt: holds a dict"):  # the first bad file in sorted order
        build(BuildSettings.from_mapping({"kind": "pt", "input": str(bad_tiles), "out": str(out), "tile_px": 32, "tiles_per_item": 4,
                                          "shuffle_seed": None}))
    assert not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp")) and not list(out.glob("shard-*.tar"))


def test_bad_pt_files_skipped_and_accounted(bad_tiles, tmp_path):
    manifest = build(BuildSettings.from_mapping({"kind": "pt", "input": str(bad_tiles), "out": str(tmp_path / "out"), "tile_px": 32,
                                                 "on_error": "skip", "tiles_per_item": 4}))
    skipped = {Path(r["path"]).name: r["reason"] for r in manifest["skipped"]}
    assert set(skipped) == set(REASONS)
    for name, word in REASONS.items():
        assert word in skipped[name], (name, skipped[name])
    assert manifest["inputs"] == 13 == manifest["written"] + manifest["n_skipped"] and manifest["written"] == 5
    assert verify(tmp_path / "out") == []


def test_labels_csv_problems_reported_together(synthetic_slides, tmp_path):
    rows = ["slide_id,label,patient_id", "class_a_000,class_a,p0", "class_a_000,class_a,p0", "class_a_001,,p1",
            "ghost_slide,class_b,p9"] + [f"class_b_00{n},class_b,p{n}" for n in range(4)]
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    with pytest.raises(LabelsError) as info:
        build(BuildSettings.from_mapping({"kind": "images", "input": str(synthetic_slides), "out": str(tmp_path / "o"),
                                          "labels": str(labels),
                                          "slide_mpp": 0.5}))
    message = str(info.value)
    assert "duplicate slide id 'class_a_000'" in message and "'class_a_001' has no label" in message
    assert "'ghost_slide' is listed but not found" in message
    assert "'class_a_002' is not in" in message and "'class_a_003' is not in" in message


def test_build_order_is_a_seeded_shuffle_of_the_sorted_slides(synthetic_slides):
    def order(**kwargs) -> list[str]:
        items = discover("images", synthetic_slides, labels_from_folders=True, **kwargs)
        assert [item.ordinal for item in items] == list(range(len(items)))
        return [item.slide_id for item in items]

    in_sorted_order = order(shuffle_seed=None)
    assert in_sorted_order == sorted(in_sorted_order)
    shuffled = order()
    assert shuffled == order() == order(shuffle_seed=0) != order(shuffle_seed=1)  # the same on every machine
    assert sorted(shuffled) == in_sorted_order and shuffled != in_sorted_order


def test_image_without_mpp_is_an_error(synthetic_slides, tmp_path):
    with pytest.raises(BuildError, match=r"class_._00.\.png: no resolution"):
        build(BuildSettings.from_mapping({"kind": "images", "input": str(synthetic_slides), "out": str(tmp_path),
                                          "labels_from_folders": True,
                                          "region_px": 64, "tile_px": 32}))


SYNTH = dict(kind="images", labels_from_folders=True, slide_mpp=0.5, region_px=64, tile_px=32, encoding="png",
             shard_bytes=40_000)


def test_resume_after_interruption_gives_identical_shards(synthetic_slides, tmp_path):
    broken_input = tmp_path / "input"
    shutil.copytree(synthetic_slides, broken_input)
    reference = build(BuildSettings.from_mapping({**SYNTH, "input": str(broken_input), "out": str(tmp_path / "ref")}))
    assert len(reference["shards"]) > 3
    victim = broken_input / "class_b" / "class_b_001.png"
    good = victim.read_bytes()
    victim.write_bytes(b"not a png")
    with pytest.raises(BuildError, match="class_b_001.png: cannot read image"):
        build(BuildSettings.from_mapping({**SYNTH, "input": str(broken_input), "out": str(tmp_path / "run")}))
    done = sorted(p.name for p in (tmp_path / "run").glob("shard-*.tar"))
    assert 0 < len(done) < len(reference["shards"])
    victim.write_bytes(good)  # the user fixes the file and runs the same command again
    resumed = build(BuildSettings.from_mapping({**SYNTH, "input": str(broken_input), "out": str(tmp_path / "run")}))
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert resumed["slides"].keys() == reference["slides"].keys()
    again = build(BuildSettings.from_mapping({**SYNTH, "input": str(broken_input), "out": str(tmp_path / "run")}))
    assert again == resumed  # complete: no-op


def test_interrupted_build_of_an_earlier_version_resumes_from_its_journal(synthetic_slides, tmp_path):
    """Builds before the shard records journalled their settings and closed shards in build-journal.jsonl: one
    interrupted after two shards refuses other settings, and resumes with its own to the uninterrupted bytes."""
    settings = {**SYNTH, "input": str(synthetic_slides)}
    reference = build(BuildSettings.from_mapping({**settings, "out": str(tmp_path / "ref")}))
    old = tmp_path / "old"
    old.mkdir()
    closed = [json.loads((tmp_path / "ref" / UNITS / f"{n:06d}.json").read_text()) for n in range(2)]
    lines = [{"build_args": reference["build_args"]}, *closed]
    (old / OLD_JOURNAL).write_text("".join(json.dumps(line) + "\n" for line in lines))
    for entry in closed:
        shutil.copy(tmp_path / "ref" / entry["shard"]["name"], old)
    with pytest.raises(UserError, match="holds an interrupted build with other settings"):
        build(BuildSettings.from_mapping({**settings, "out": str(old), "min_tissue": 0.3}))
    resumed = build(BuildSettings.from_mapping({**settings, "out": str(old)}))
    assert [s["sha256"] for s in resumed["shards"]] == [s["sha256"] for s in reference["shards"]]
    assert resumed["skipped"] == reference["skipped"] and not (old / OLD_JOURNAL).exists()


def test_parallel_workers_and_parts_match_serial_build(synthetic_slides, tmp_path):
    serial = build(BuildSettings.from_mapping({**SYNTH, "input": str(synthetic_slides), "out": str(tmp_path / "serial")}))
    parallel = build(BuildSettings.from_mapping({**SYNTH, "input": str(synthetic_slides), "out": str(tmp_path / "parallel"), "workers": 2}))
    assert [s["sha256"] for s in parallel["shards"]] == [s["sha256"] for s in serial["shards"]]
    for part in ("0/2", "1/2"):
        assert cli(["build", "images", str(synthetic_slides), "--out", str(tmp_path / "parts"),
                    "--labels-from-folders", "--slide-mpp", "0.5", "--region-px", "64", "--tile-px", "32",
                    "--encoding", "png", "--part", part, "shard_bytes=40000"]) == 0
    assert cli(["merge", str(tmp_path / "parts")]) == 0
    merged = json.loads((tmp_path / "parts" / "manifest.json").read_text())
    assert merged["samples"] == serial["samples"] and merged["slides"].keys() == serial["slides"].keys()
    assert merged["class_counts"] == serial["class_counts"]
    assert verify(tmp_path / "parts") == []


def test_verify_catches_truncated_and_missing_shards(synthetic_slides, tmp_path, capsys):
    out = tmp_path / "out"
    build(BuildSettings.from_mapping({**SYNTH, "input": str(synthetic_slides), "out": str(out)}))
    assert cli(["verify", str(out)]) == 0
    shard = out / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    (out / "shard-000002.tar").unlink()
    assert cli(["verify", str(out)]) == 1
    report = capsys.readouterr().out
    assert "shard-000001.tar: sha256 differs" in report and "shard-000002.tar: missing" in report



def test_verify_checks_slide_embedding_shards(tmp_path):
    def bag(slide: str, regions: int, bad: bool = False) -> SlideBag:
        features = torch.randn(regions, 8)
        if bad:
            features[0, 0] = float("nan")
        return SlideBag(slide, slide, "a", features, torch.zeros(regions, 2, dtype=torch.long))

    good, broken = tmp_path / "good", tmp_path / "broken"
    write_slide_bags(good, [bag("s1", 3), bag("s2", 5)], ["a"], build_args={})
    assert verify(good) == []  # region counts come from the bags (3 + 5), one sample per slide
    write_slide_bags(broken, [bag("s1", 3), bag("s2", 5, bad=True)], ["a"], build_args={})
    problems = verify(broken)
    assert any("NaN or Inf" in p for p in problems) and any("slide s2: 0 regions found" in p for p in problems)


def test_config_file_and_overrides(synthetic_slides, tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text("region_px: 128\ntile_px: 64\nslide_mpp: 0.5\nlabels_from_folders: true\n")
    out = tmp_path / "out"
    assert cli(["build", "images", str(synthetic_slides), "--out", str(out), "--config", str(config),
                "--tile-px", "32", "encoding=png"]) == 0
    resolved = (out / "build-config.yaml").read_text()
    assert "region_px: 128" in resolved and "tile_px: 32" in resolved and "encoding: png" in resolved
    with pytest.raises(UnknownSettingError, match="^unknown config key 'no_such_key'"):  # printed without quotes
        cli(["build", "images", str(synthetic_slides), "--out", str(tmp_path / "x"), "no_such_key=1"])


@pytest.mark.parametrize("bad, key", [(["encoding=webp"], "encoding"), (["--on-error", "ignore"], "on_error"),
                                      (["--min-tissue", "2"], "min_tissue"), (["workers=0"], "workers")])
def test_a_bad_build_setting_fails_at_the_start_naming_its_key(synthetic_slides, tmp_path, bad, key):
    from hipt_e2e.errors import SettingError

    with pytest.raises(SettingError, match=f"^{key}: "):
        cli(["build", "images", str(synthetic_slides), "--out", str(tmp_path / "out"), *bad])
    assert not (tmp_path / "out").exists()


def test_inspect_and_bench_commands(synthetic_slides, tmp_path, capsys):
    out = tmp_path / "out"
    build(BuildSettings.from_mapping({**SYNTH, "input": str(synthetic_slides), "out": str(out)}))
    assert cli(["inspect", str(out), "--mosaic", str(tmp_path / "mosaic.png")]) == 0
    table = capsys.readouterr().out
    assert re.search(r"class_a\s+4\s+64\n", table) and re.search(r"class_b_003\s+class_b\s+\S+\s+16", table)
    assert (tmp_path / "mosaic.png").stat().st_size > 0
    assert cli(["bench", str(out), "--seconds", "0.5"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("tiles/s: ") and float(last.split()[1]) > 0
