"""Tile features of TRIDENT, CLAM and STAMP in (files written as each tool's writer writes them) and ours out
in TRIDENT's layout: tiles placed by their coordinates, refusals naming the slide, an exact round trip, and
pretrain_vit4k, embed_regions and train_wsi on imported features."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from hipt_e2e.data import RegionStream, load_manifest
from hipt_e2e.data.embeddings import read_slide_bags
from hipt_e2e.embedding import embed_tiles
from hipt_e2e.errors import InputError, UnknownSettingError
from hipt_e2e.io import sha256_file
from hipt_e2e.lineage import encoder_record, read_lineage
from hipt_e2e.models.bundle import tile_architecture
from hipt_e2e.models.encoders import BACKBONE_EXPORT, TileModel, build_tile_encoder
from shards.build import BuildSettings, build
from shards.cli import main as shards_main
from shards.features import FeatureBuildSettings, build_features
from tests.test_dino_recipes import REPO, run_recipe

sys.path.insert(0, str(REPO / "recipes"))
import train_wsi  # noqa: E402

WIDTH, GRID = 12, 4


def coded_features(cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each tile's features start with its own lattice column and row, so any misplacement shows."""
    features = rng.normal(size=(len(cells), WIDTH)).astype(np.float32)
    features[:, :2] = cells
    return features


def slide_cells(rng: np.random.Generator, cols: int = 10, rows: int = 7, missing: float = 0.3) -> np.ndarray:
    """[col, row] of a slide's tiles: a 10 x 7 lattice with some tiles missing (glass the tool left out)."""
    col, row = np.meshgrid(np.arange(cols), np.arange(rows))
    cells = np.stack([col.ravel(), row.ravel()], axis=1)
    return cells[rng.random(len(cells)) >= missing]


def write_trident(path: Path, features: np.ndarray, coords: np.ndarray, patch_size: int = 8, level0_mag: int = 40,
                  target_mag: int = 20, encoder: str = "uni_v1", overlap: int = 0) -> None:
    """As TRIDENT's save_h5 from extract_patch_features: chunked datasets, attributes on features and coords."""
    path.parent.mkdir(parents=True, exist_ok=True)
    attributes = {"patch_size": patch_size, "patch_size_level0": patch_size * level0_mag // target_mag,
                  "level0_magnification": level0_mag, "target_magnification": target_mag, "overlap": overlap,
                  "name": path.stem, "savetodir": str(path.parent), "level0_width": 4096, "level0_height": 4096}
    with h5py.File(path, "w") as f:
        for key, value, attrs in (("features", features, {"name": path.stem, "savetodir": str(path.parent),
                                                          "encoder": encoder}),
                                  ("coords", coords.astype(np.int64), attributes)):
            dataset = f.create_dataset(key, shape=value.shape, maxshape=(None, *value.shape[1:]),
                                       chunks=(1, *value.shape[1:]), dtype=value.dtype)
            dataset[:] = value
            dataset.attrs.update(attrs)


def write_clam(path: Path, features: np.ndarray, coords: np.ndarray) -> None:
    """As CLAM's extract_features_fp.py: float32 features, int32 coords, chunks of 32, no attributes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        for key, value in (("features", features.astype(np.float32)), ("coords", coords.astype(np.int32))):
            f.create_dataset(key, data=value, maxshape=(None, *value.shape[1:]), chunks=(32, *value.shape[1:]))


def write_stamp(path: Path, features: np.ndarray, coords_um: np.ndarray, tile_size_um: float = 256.0,
                tile_size_px: int = 224) -> None:
    """As STAMP's preprocessing: float coordinates in micrometres, float16 `feats`, the file's attributes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f["coords"] = coords_um.astype(np.float32)
        f["feats"] = features.astype(np.float16)
        f.attrs.update({"stamp_version": "2.4.0", "extractor": "virchow2", "unit": "um", "tile_size_um": tile_size_um,
                        "tile_size_px": tile_size_px, "code_hash": "0123abcd", "feat_type": "tile"})


def imported(source: Path, out: Path, **settings) -> tuple[dict, dict]:
    """Build features with float32 grids; the manifest and {(slide, region_index): (grid, record)}."""
    manifest = build_features(FeatureBuildSettings.from_mapping(
        {"input": str(source), "out": str(out), "grid": GRID, "dtype": "float32", **settings}))
    regions = {(item["record"]["slide_id"], item["record"]["region_index"]): (item["pixels"].numpy(), item["record"])
               for item in RegionStream(out)}
    return manifest, regions


def check_placement(regions: dict, cells: dict[str, np.ndarray], step: float) -> None:
    """Every tile sits where its coded features say, every other grid place is background."""
    for slide_id, slide in cells.items():
        placed = set()
        for (sid, _), (grid, record) in regions.items():
            if sid != slide_id:
                continue
            assert record["size"] == round(GRID * step) and grid.shape == (WIDTH, GRID, GRID)
            tissue = np.array(record["tissue"]).reshape(GRID, GRID)
            for r in range(GRID):
                for c in range(GRID):
                    if tissue[r, c]:
                        col, row = grid[0, r, c], grid[1, r, c]
                        assert (round(record["x"] / step) + c, round(record["y"] / step) + r) == (col, row)
                        placed.add((int(col), int(row)))
                    else:
                        assert not grid[:, r, c].any()
        assert placed == {tuple(cell) for cell in slide.tolist()}


def test_trident_clam_and_stamp_files_place_every_tile_by_its_coordinates(tmp_path):
    rng = np.random.default_rng(0)
    cells = {f"s{n}": slide_cells(rng) for n in range(3)}
    for slide_id, slide in cells.items():
        write_trident(tmp_path / "trident" / f"{slide_id}.h5", coded_features(slide, rng), slide * 16)
        write_clam(tmp_path / "clam" / f"{slide_id}.h5", coded_features(slide, rng), slide * 16)
        write_stamp(tmp_path / "stamp" / f"{slide_id}.h5", coded_features(slide, rng), slide * 256.0)

    manifest, regions = imported(tmp_path / "trident", tmp_path / "out_trident")
    check_placement(regions, cells, 16)
    lineage = read_lineage(tmp_path / "out_trident")
    assert manifest["kind"] == "token_grids" and lineage.kind == "token_grids"
    assert (lineage.geometry.region_px, lineage.geometry.tile_px, lineage.geometry.mpp, lineage.geometry.width) == (
        32, 8, 0.5, WIDTH)
    assert lineage.tile_encoder.architecture == {"encoder": "uni_v1", "embed_dim": WIDTH,
                                                 "features_format": "trident", "magnification": 20.0}
    for slide_id, entry in manifest["slides"].items():
        assert entry["source_sha256"] == sha256_file(tmp_path / "trident" / f"{slide_id}.h5")
    assert next(iter(regions.values()))[1]["slide_mpp"] == 0.25  # level 0 at 40x

    with pytest.raises(InputError, match=r"clam/s\d.h5: records no tile size; give --tile-px"):
        imported(tmp_path / "clam", tmp_path / "refused", format="clam")
    _, regions = imported(tmp_path / "clam", tmp_path / "out_clam", format="clam", tile_px=8, mpp=0.5, slide_mpp=0.25,
                          encoder="resnet50_trunc")
    check_placement(regions, cells, 16)

    _, regions = imported(tmp_path / "stamp", tmp_path / "out_stamp", format="stamp")  # level 0 = the tiles' 224 px per 256 um
    check_placement(regions, cells, 224)
    assert next(iter(regions.values()))[1]["mpp"] == pytest.approx(256 / 224)
    _, regions = imported(tmp_path / "stamp", tmp_path / "out_stamp_mpp", format="stamp", slide_mpp=0.5)  # um -> level-0 px
    check_placement(regions, cells, 512)


def test_a_clam_slide_off_origin_and_a_missing_tile(tmp_path):
    """CLAM's tiles start at the tissue's bounding box, not at 0: the lattice takes the first tile's phase."""
    cells = np.array([[0, 0], [1, 0], [3, 0], [0, 1], [4, 1]])  # (2, 0) and a whole region's worth are missing
    write_clam(tmp_path / "in" / "a.h5", coded_features(cells, np.random.default_rng(1)), cells * 16 + [5, 3])
    _, regions = imported(tmp_path / "in", tmp_path / "out", format="clam", tile_px=8, mpp=0.5, slide_mpp=0.25, encoder="x")
    assert sorted(regions) == [("a", 0), ("a", 1)]
    (grid, record), (_, second) = regions["a", 0], regions["a", 1]
    assert (record["x"], record["y"], second["x"], second["y"]) == (5, 3, 5 + 64, 3)
    assert record["tissue"][:4] == [1, 1, 0, 1] and not grid[:, 0, 2].any()
    assert grid[0, 1, 0] == 0 and grid[1, 1, 0] == 1


def test_off_grid_and_overlapping_tiles_are_refused_naming_the_slide(tmp_path):
    rng = np.random.default_rng(2)
    cells = slide_cells(rng)
    coords = cells * 16
    coords[3] += [3, 0]
    write_trident(tmp_path / "off" / "bad_slide.h5", coded_features(cells, rng), coords)
    with pytest.raises(InputError, match=r"bad_slide.h5: the tile at level-0 .* off the 16 px tile grid .*\(--snap 0.19 would"):
        imported(tmp_path / "off", tmp_path / "o1")
    _, regions = imported(tmp_path / "off", tmp_path / "o2", snap=0.25)  # 3 px of 16 snap onto the grid
    check_placement(regions, {"bad_slide": cells}, 16)

    doubled = np.concatenate([cells, cells[:1]])
    write_trident(tmp_path / "twice" / "doubled.h5", coded_features(doubled, rng), doubled * 16)
    x, y = cells[0] * 16
    with pytest.raises(InputError, match=rf"doubled.h5: 2 tiles fall on the tile at level-0 \({x}, {y}\)"):
        imported(tmp_path / "twice", tmp_path / "o3")
    write_trident(tmp_path / "overlap" / "overlapping.h5", coded_features(cells, rng), cells * 12, overlap=4)
    with pytest.raises(InputError, match=r"overlapping.h5: tiles overlap by 4 px"):
        imported(tmp_path / "overlap", tmp_path / "o4")


def test_cli_labels_skips_and_refused_flags(tmp_path, capsys):
    rng = np.random.default_rng(3)
    rows = []
    for n in range(4):
        cells = slide_cells(rng)
        write_trident(tmp_path / "in" / f"t{n}.h5", coded_features(cells, rng), cells * 16)
        rows.append({"slide_id": f"t{n}", "label": "ab"[n % 2], "patient_id": f"p{n}"})
    write_trident(tmp_path / "in" / "wide.h5", rng.normal(size=(3, WIDTH + 1)).astype(np.float32),
                  np.array([[0, 0], [16, 0], [32, 0]]))
    rows.append({"slide_id": "wide", "label": "a", "patient_id": "p9"})
    with open(tmp_path / "labels.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["slide_id", "label", "patient_id"])
        writer.writeheader()
        writer.writerows(rows)
    arguments = ["build", "features", str(tmp_path / "in"), "--format", "trident", "--grid", str(GRID),
                 "--labels", str(tmp_path / "labels.csv"), "--on-error", "skip", "--out", str(tmp_path / "out")]
    assert shards_main(arguments) == 0
    assert "5 inputs = 4 written + 1 skipped" in capsys.readouterr().out
    manifest = load_manifest(tmp_path / "out")
    assert manifest["skipped"][0]["path"].endswith("wide.h5") and "width 13" in manifest["skipped"][0]["reason"]
    assert manifest["class_counts"]["slides"] == {"a": 2, "b": 2} and manifest["slides"]["t1"]["patient_id"] == "p1"
    assert shards_main(arguments) == 0  # finished with the same settings: nothing to do
    with pytest.raises(UnknownSettingError, match="region_px"):
        shards_main([*arguments[:-1], str(tmp_path / "o2"), "--region-px", "64"])


def test_ours_to_trident_and_back_gives_the_same_grids(synthetic_slides, tmp_path):
    build(BuildSettings.from_mapping({"kind": "images", "input": str(synthetic_slides), "out": str(tmp_path / "regions"),
                                      "labels": str(synthetic_slides / "labels.csv"), "slide_mpp": 0.5, "tile_px": 32,
                                      "region_px": 128, "encoding": "png"}))
    model = TileModel(preset="tiny")
    torch.manual_seed(0)
    embed_tiles(build_tile_encoder(model).eval(), tmp_path / "regions", tmp_path / "grids", settings={},
                tile_encoder=encoder_record(tile_architecture(model), None), normalisation="hipt",
                regions_per_batch=4, tiles_per_call=64)
    assert shards_main(["export", str(tmp_path / "grids"), "--out", str(tmp_path / "h5")]) == 0
    with h5py.File(tmp_path / "h5" / "class_a_000.h5") as f:
        attrs = dict(f["coords"].attrs)
        assert f["coords"].dtype == np.int64 and f["features"].shape[1] == 48 and f["features"].attrs["encoder"] == "vit"
    assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["target_magnification"], attrs["overlap"]) == (
        32, 32, 20, 0)
    build_features(FeatureBuildSettings.from_mapping({"input": str(tmp_path / "h5"), "out": str(tmp_path / "back"),
                                                      "labels": str(synthetic_slides / "labels.csv"), "grid": 4}))
    ours = {(i["record"]["slide_id"], i["record"]["region_index"]): i for i in RegionStream(tmp_path / "grids")}
    back = {(i["record"]["slide_id"], i["record"]["region_index"]): i for i in RegionStream(tmp_path / "back")}
    assert sorted(back) == sorted(ours)
    for key, item in ours.items():
        assert torch.equal(back[key]["pixels"], item["pixels"]) and back[key]["pixels"].dtype == torch.float16
        fields = ("x", "y", "size", "tissue", "tile_px", "grid", "mpp", "label", "patient_id")
        assert {f: back[key]["record"][f] for f in fields} == {f: item["record"][f] for f in fields}
    assert load_manifest(tmp_path / "back")["slides"].keys() == load_manifest(tmp_path / "grids")["slides"].keys()


def test_embed_regions_and_train_wsi_run_on_imported_features(tmp_path):
    rng = np.random.default_rng(4)
    rows = []
    for n in range(6):
        cells = slide_cells(rng)
        features = coded_features(cells, rng) + (n % 2)  # the class shifts every feature
        write_stamp(tmp_path / "in" / f"s{n}.h5", features, cells * 256.0)
        rows.append(f"s{n},{'ab'[n % 2]},p{n}")
    (tmp_path / "labels.csv").write_text("slide_id,label,patient_id\n" + "\n".join(rows) + "\n")
    build_features(FeatureBuildSettings.from_mapping({"input": str(tmp_path / "in"), "out": str(tmp_path / "grids"),
                                                      "format": "stamp", "grid": GRID,
                                                      "labels": str(tmp_path / "labels.csv")}))
    run_recipe("pretrain_vit4k", f"data.shards={tmp_path / 'grids'}", f"out={tmp_path / 'vit4k'}",
               "train.steps_per_epoch=1", "train.epochs=1")
    run_recipe("embed_regions", f"data.shards={tmp_path / 'grids'}", f"out={tmp_path / 'regions'}",
               f"model.weights={tmp_path / 'vit4k' / BACKBONE_EXPORT}")
    run_recipe("embed_regions", f"data.shards={tmp_path / 'grids'}", f"out={tmp_path / 'tiles'}", "embed.level=tile")
    bags, _ = read_slide_bags(tmp_path / "tiles")  # every grid place of every region, as from embed_tiles' grids
    assert sum(len(bag.features) for bag in bags) == load_manifest(tmp_path / "grids")["samples"] * GRID ** 2
    bags, _ = read_slide_bags(tmp_path / "regions")
    assert len(bags) == 6 and bags[0].features.shape[1] == 24  # the tiny ViT4K's width
    for bags_dir, name in ((tmp_path / "regions", "vit_wsi"), (tmp_path / "tiles", "abmil")):
        metrics = train_wsi.main([f"data.shards={bags_dir}", f"out={tmp_path / name}", "folds=3", "optim.epochs=2",
                                  f"model.name={name}"])
        assert len(list(csv.DictReader(open(tmp_path / name / "predictions.csv")))) == 6, metrics
