"""hipt-predict: a pyramidal TIFF built from real images, planted attention, an unreadable file."""
from __future__ import annotations

import contextlib
import csv
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hipt_e2e.config import resolve_settings
from hipt_e2e.data.sources import OpenSlideReader
from hipt_e2e.inference.heatmaps import region_score_map
from hipt_e2e.inference.predict import Predictor, PredictSettings, main, predict_inputs
from hipt_e2e.models import HIPT
from hipt_e2e.training.checkpointing import export_safetensors
from tests.conftest import lymphoma_images, read_rgb
from tests.launch import launch
from tests.test_openslide import write_pyramid

REPO = Path(__file__).resolve().parents[1]

BRIGHT = (384, 256)  # level-0 origin of the injected region (128 px regions at 0.5 um/px)


@pytest.fixture(scope="module")
def slide_dir(lymphoma_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("predict")
    fields = [read_rgb(p)[:256, :256] for p in lymphoma_images(lymphoma_dir, 4)]
    mosaic = np.stack(fields).reshape(3, 4, 256, 256, 3).transpose(0, 2, 1, 3, 4).reshape(768, 1024, 3).copy()
    mosaic[BRIGHT[1]:BRIGHT[1] + 128, BRIGHT[0]:BRIGHT[0] + 128] = (255, 240, 120)  # bright, saturated
    write_pyramid(root / "slide_a.tiff", mosaic, mpp=0.5)
    (root / "broken.svs").write_bytes(b"this is not a slide")
    return root


def config(tmp_path: Path, **model) -> PredictSettings:
    return resolve_settings(PredictSettings, None, [
        "model.preset=tiny", "model.classes=[CLL, FL]", f"out={tmp_path / 'out'}", "geometry.min_tissue=0.0",
        *[f"model.{k}={v}" for k, v in model.items()]])


def plant_attention(model: HIPT, slide: Path, target: tuple[int, int]) -> None:
    """Hand-set the slide model's gated attention so that it picks the region at `target`.

    The pooling input h of each region is read with a hook; attention_a scores the projection of h on
    (h_target - mean h_others), attention_b is opened fully, attention_c scales it up.
    """
    predictor = Predictor([(model, None)], ["CLL", "FL"])
    reader = OpenSlideReader(slide)
    from hipt_e2e.data.sources import iter_regions
    from hipt_e2e.data.tiling import RegionGeometry

    regions = list(iter_regions(reader, RegionGeometry(128, 32, 0.5), min_tissue=0.0))
    seen = {}
    hook = model.slide_model.global_attn_pool.register_forward_hook(lambda m, i, o: seen.update(h=i[0]))
    predictor.predict(((r.x, r.y, r.rgb) for r in regions), 128)
    hook.remove()
    h = seen["h"]
    index = [(r.x, r.y) for r in regions].index(target)
    others = torch.cat([h[:index], h[index + 1:]])
    direction = h[index] - others.mean(0)
    middle = (h[index] @ direction + (others @ direction).max()) / 2
    pool = model.slide_model.global_attn_pool
    with torch.no_grad():
        for layer in (pool.attention_a[0], pool.attention_b[0], pool.attention_c):
            layer.weight.zero_()
            layer.bias.zero_()
        scale = 20 / (h[index] @ direction - middle)
        pool.attention_a[0].weight[0] = scale * direction
        pool.attention_a[0].bias[0] = -scale * middle
        pool.attention_b[0].bias.fill_(10.0)
        pool.attention_c.weight[0, 0] = 30.0


def test_predict_tiff_with_planted_attention_and_a_broken_file(slide_dir, tmp_path):
    torch.manual_seed(0)
    model = HIPT.from_preset("tiny", n_classes=2).eval()
    plant_attention(model, slide_dir / "slide_a.tiff", BRIGHT)
    cfg = config(tmp_path)
    predictor = Predictor([(model, None)], ["CLL", "FL"], chunk_regions=5)
    assert predict_inputs(cfg, [slide_dir], predictor) == 1
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))}
    assert rows["broken"]["status"] == "failed" and "OpenSlide" in rows["broken"]["error"]
    ok = rows["slide_a"]
    assert ok["status"] == "ok" and int(ok["n_regions"]) == 48
    assert float(ok["prob_CLL"]) + float(ok["prob_FL"]) == pytest.approx(1, abs=1e-5)
    heatmaps = tmp_path / "out" / "heatmaps"
    for name in ("slide_a_regions.png", "slide_a_tiles_top1.png", "slide_a_tiles_top3.png"):
        assert (heatmaps / name).read_bytes()[:4] == b"\x89PNG"

    # the planted region gets the attention, and the heatmap cell holding it is where it lies
    reader = OpenSlideReader(slide_dir / "slide_a.tiff")
    from hipt_e2e.data.sources import iter_regions
    from hipt_e2e.data.tiling import RegionGeometry

    result = predictor.predict(((r.x, r.y, r.rgb) for r in iter_regions(
        reader, RegionGeometry(128, 32, 0.5), min_tissue=0.0)), 128)
    assert tuple(result.coords[result.scores.argmax()]) == BRIGHT and result.scores.max() > 0.99
    thumb = reader.thumbnail(1024)
    scale = thumb.shape[1] / reader.width
    heat = region_score_map(thumb.shape[:2], scale, result.coords, 128, result.scores)
    hot_y, hot_x = np.unravel_index(np.nanargmax(heat), heat.shape)
    assert BRIGHT[0] <= hot_x / scale < BRIGHT[0] + 128 and BRIGHT[1] <= hot_y / scale < BRIGHT[1] + 128
    assert result.tile_attention.shape == (48, 4, 4)


def test_cli_with_weights_file_and_exit_code(slide_dir, tmp_path):
    model = HIPT.from_preset("tiny", n_classes=2)
    export_safetensors(model, tmp_path / "hipt.safetensors")
    code = main([str(slide_dir / "slide_a.tiff"), str(slide_dir / "broken.svs"), "model.preset=tiny",
                 "model.classes=[CLL, FL]", f"model.weights={tmp_path / 'hipt.safetensors'}",
                 f"out={tmp_path / 'out'}", "geometry.min_tissue=0.0"])
    assert code == 1
    assert (tmp_path / "out" / "config.yaml").exists()
    assert len(list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))) == 2


def test_wrong_weights_fail_clearly(tmp_path):
    from hipt_e2e.inference.predict import build_predictor
    from hipt_e2e.models import CheckpointError

    export_safetensors(HIPT.from_preset("tiny", n_classes=3), tmp_path / "three.safetensors")
    with pytest.raises(CheckpointError, match="classifier"):
        build_predictor(config(tmp_path, weights=tmp_path / "three.safetensors"))


@pytest.mark.parametrize("bad, key", [("tta=flips", "tta"), ("model.head=mlp", "model.head"),
                                      ("geometry.min_tissue=1.5", "geometry.min_tissue"),
                                      ("chunk_regions=0", "chunk_regions")])
def test_a_bad_setting_fails_at_the_start_naming_its_key(tmp_path, bad, key):
    from hipt_e2e.errors import SettingError

    with pytest.raises(SettingError, match=f"^{key}: "):
        main([str(tmp_path), "model.preset=tiny", "model.classes=[CLL, FL]", f"out={tmp_path / 'out'}", bad])
    assert not (tmp_path / "out").exists()


def test_predict_region_shards_with_an_fc_head(synthetic_slides, tmp_path):
    from shards.build import BuildSettings, build

    build(BuildSettings.from_mapping({"kind": "images", "input": str(synthetic_slides), "out": str(tmp_path / "shards"),
                                      "labels_from_folders": True, "slide_mpp": 0.5, "region_px": 128, "tile_px": 32}))
    model = HIPT.from_preset("tiny", n_classes=2)
    from hipt_e2e.models.mil import RegionFC

    fc = RegionFC(2, dim=24).eval()
    export_safetensors(model.tile_encoder, tmp_path / "tile.safetensors")
    export_safetensors(model.region_encoder, tmp_path / "region.safetensors")
    export_safetensors(fc, tmp_path / "fc.safetensors")
    code = main([str(tmp_path / "shards"), "input_kind=shards", "model.preset=tiny", "model.classes=[a, b]",
                 "model.head=fc", f"model.tile_encoder={tmp_path / 'tile.safetensors'}",
                 f"model.region_encoder={tmp_path / 'region.safetensors'}",
                 f"model.slide_model={tmp_path / 'fc.safetensors'}", f"out={tmp_path / 'out'}", "top_regions=1"])
    assert code == 0
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert sorted(r["slide_id"] for r in rows) == sorted(p.stem for p in synthetic_slides.rglob("*.png"))
    assert all(int(r["n_regions"]) == 4 for r in rows)  # 256 px slides -> 2 x 2 regions of 128 px
    assert (tmp_path / "out" / "heatmaps" / f"{rows[0]['slide_id']}_tiles_top1.png").exists()


def test_predict_from_a_trained_run_folder(shards, tmp_path):
    """A tiny e2e run with geometry overrides predicts its own slides from its folder: each fold model on
    its test slides gives that run's predictions.csv, the ensemble is the mean of the fold models."""
    from hipt_e2e.models.bundle import load_bundle
    from tests.test_e2e import load_recipe, settings

    geometry = ["model.tile.embed_dim=24", "model.tile.depth=1", "model.region.in_dim=24", "model.region.embed_dim=12",
                "model.region.depth=1"]
    load_recipe().main(settings(shards, tmp_path / "run", *geometry, "train.epochs=1"))
    card = json.loads((tmp_path / "run" / "fold_1" / "model_card.json").read_text())
    assert card["kind"] == "hipt" and card["classes"] == ["class_a", "class_b"] and card["region_px"] == 128
    assert card["architecture"]["tile"]["embed_dim"] == 24 and card["architecture"]["slide"]["dim"] == 12
    assert card["fold"] == {"repeat": 0, "index": 1} and 0 <= card["test_metrics"]["balanced_accuracy"] <= 1
    assert load_bundle(tmp_path / "run" / "fold_1").model.region_encoder.num_features == 12

    trained = {(int(r["fold"]), r["slide_id"]): r for r in csv.DictReader(open(tmp_path / "run" / "predictions.csv"))}
    folds = []
    for fold in range(3):
        assert main([str(shards), "input_kind=shards", "--model", str(tmp_path / "run"), f"model.fold={fold}",
                     f"out={tmp_path / f'fold_{fold}'}", "top_regions=0"]) == 0
        rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / f"fold_{fold}" / "predictions.csv"))}
        folds.append(rows)
        for (trained_fold, slide), row in trained.items():
            if trained_fold == fold:
                for name in ("prob_class_a", "prob_class_b"):
                    assert float(rows[slide][name]) == pytest.approx(float(row[name]), abs=1e-5), (fold, slide)
    assert main([str(shards), "input_kind=shards", f"model.card={tmp_path / 'run'}", f"out={tmp_path / 'all'}",
                 "top_regions=0"]) == 0
    for row in csv.DictReader(open(tmp_path / "all" / "predictions.csv")):
        mean = np.mean([float(rows[row["slide_id"]]["prob_class_a"]) for rows in folds])
        assert float(row["prob_class_a"]) == pytest.approx(mean, abs=2e-6)
    with pytest.raises(FileNotFoundError, match="no model_card.json and no fold folders"):
        main([str(shards), "input_kind=shards", f"model.card={tmp_path}", f"out={tmp_path / 'none'}"])


def test_prefetch_reads_ahead_boundedly_and_passes_errors_on():
    from hipt_e2e.inference.predict import prefetch

    produced = []

    def regions(fail_at: int | None = None):
        for n in range(10):
            if n == fail_at:
                raise OSError(f"corrupt tile in region {n}")
            produced.append(n)
            yield n

    ahead = prefetch(regions(), 2)
    assert next(ahead) == 0
    time.sleep(0.3)
    assert len(produced) <= 4  # 1 consumed + 2 queued + 1 waiting to be queued: memory stays bounded
    assert list(ahead) == list(range(1, 10))
    with pytest.raises(OSError, match="corrupt tile in region 3"):
        list(prefetch(regions(fail_at=3), 2))


def test_two_processes_write_the_one_process_predictions(shards, tmp_path):
    """accelerate launch --num_processes 2 splits the slides and writes one predictions.csv, equal to one process's."""
    model = HIPT.from_preset("tiny", n_classes=2)
    export_safetensors(model, tmp_path / "hipt.safetensors")
    settings = [str(shards), "input_kind=shards", "model.preset=tiny", "model.classes=[a, b]",
                f"model.weights={tmp_path / 'hipt.safetensors'}", "top_regions=1"]
    result = launch("recipes/predict.py", [*settings, f"out={tmp_path / 'two'}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert main([*settings, f"out={tmp_path / 'one'}"]) == 0
    one, two = (list(csv.DictReader((tmp_path / run / "predictions.csv").read_text().splitlines()))
                for run in ("one", "two"))
    assert len(one) == len(two) == 12
    for row_one, row_two in zip(one, two):  # probabilities to 1e-5 (one thread there, two here: other sums)
        probs = [column for column in row_one if column.startswith("prob_")]
        assert {k: v for k, v in row_one.items() if k not in probs} == {k: v for k, v in row_two.items() if k not in probs}
        assert [float(row_one[c]) for c in probs] == pytest.approx([float(row_two[c]) for c in probs], abs=1e-5)
    assert len(list((tmp_path / "two" / "heatmaps").glob("*_regions.png"))) == 12  # both processes drew theirs


def test_geojson_regions_and_tiles_map_back_to_the_slide(tmp_path):
    """Regions read at 0.5 um/px from a 0.25 um/px slide (256 level-0 px each), border regions clipped:
    the polygons are where the regions were read, inside the slide, in valid GeoJSON with QuPath's keys."""
    rng = np.random.default_rng(0)
    width, height = 900, 700  # not multiples of 256: the last row and column of regions are clipped
    level0 = rng.integers(80, 220, size=(height, width, 3), dtype=np.uint8)
    write_pyramid(tmp_path / "slides" / "fine.tiff", level0, mpp=0.25)
    torch.manual_seed(0)
    predictor = Predictor([(HIPT.from_preset("tiny", n_classes=2).eval(), None)], ["CLL", "FL"])
    cfg = config(tmp_path)
    assert predict_inputs(cfg, [tmp_path / "slides"], predictor) == 0
    collection = json.loads((tmp_path / "out" / "heatmaps" / "fine.geojson").read_text())

    assert collection["type"] == "FeatureCollection"
    for feature in collection["features"]:
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon"
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]
        xs, ys = np.array(ring).T
        assert 0.5 * np.sum(xs[:-1] * ys[1:] - xs[1:] * ys[:-1]) > 0  # RFC 7946: exterior ring counter-clockwise
        assert xs.min() >= 0 and ys.min() >= 0 and xs.max() <= width and ys.max() <= height
        properties = feature["properties"]
        assert properties["objectType"] in ("detection", "tile")
        assert len(properties["classification"]["color"]) == 3 and properties["classification"]["name"]
        assert all(isinstance(v, (int, float)) for v in properties["measurements"].values())

    from hipt_e2e.data.sources import iter_regions
    from hipt_e2e.data.tiling import RegionGeometry

    reader = OpenSlideReader(tmp_path / "slides" / "fine.tiff")
    geometry = RegionGeometry(128, 32, 0.5)
    regions = list(iter_regions(reader, geometry, min_tissue=0.0))
    result = predictor.predict(((r.x, r.y, r.rgb) for r in regions), 256)
    detections = [f for f in collection["features"] if f["properties"]["objectType"] == "detection"]
    assert len(detections) == len(regions) == 12  # 4 x 3 regions of 256 level-0 px
    for feature, region, score in zip(detections, regions, result.scores):
        (x0, y0), _, (x1, y1) = feature["geometry"]["coordinates"][0][:3]
        assert (x0, y0) == (region.x, region.y) and (x1, y1) == (min(x0 + 256, width), min(y0 + 256, height))
        assert feature["properties"]["measurements"]["attention"] == pytest.approx(float(score), abs=1e-6)
        # reading the slide again at the polygon's corner gives the pixels the model saw
        assert np.array_equal(reader.read(int(x0), int(y0), 256, 128), region.rgb)
    tiles = [f for f in collection["features"] if f["properties"]["objectType"] == "tile"]
    top = {f["properties"]["measurements"]["region"] for f in tiles}
    assert len(top) == 3 and int(np.argmax(result.scores)) in top
    for index in top:  # each top region's 16 tiles of 64 level-0 px cover it (clipped like it)
        mine = [np.array(f["geometry"]["coordinates"][0]) for f in tiles if f["properties"]["measurements"]["region"] == index]
        area = sum(np.ptp(ring[:, 0]) * np.ptp(ring[:, 1]) for ring in mine)
        (x0, y0), (x1, y1) = detections[index]["geometry"]["coordinates"][0][0], detections[index]["geometry"]["coordinates"][0][2]
        assert area == pytest.approx((x1 - x0) * (y1 - y0)) and max(np.ptp(r[:, 0]) for r in mine) == 64


def test_dihedral_tta_makes_predictions_independent_of_region_orientation():
    """Every region turned by 90 degrees (or mirrored) is one of the 8 poses the TTA already scores: the
    same slide output up to the order of an 8-term mean; without TTA the output moves."""
    from hipt_e2e.data.augment import pose, tta_poses

    torch.manual_seed(0)
    model = HIPT.from_preset("tiny", n_classes=2).eval()
    rng = np.random.default_rng(1)
    regions = [(128 * i, 0, rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8)) for i in range(5)]

    def turned(flip: bool, turns: int):
        return [(x, y, pose(torch.from_numpy(rgb).permute(2, 0, 1), flip, turns).permute(1, 2, 0).numpy())
                for x, y, rgb in regions]

    plain, tta = (Predictor([(model, None)], ["a", "b"], chunk_regions=2, tta=name) for name in ("none", "dihedral"))
    assert not np.allclose(plain.predict(turned(False, 1), 128).probs, plain.predict(regions, 128).probs, atol=1e-4)
    reference = tta.predict(regions, 128)
    for flip, turns in ((False, 1), (True, 0), (True, 3)):
        moved = tta.predict(turned(flip, turns), 128)
        np.testing.assert_allclose(moved.probs, reference.probs, rtol=0, atol=1e-6)  # 8 terms summed in another order
        np.testing.assert_allclose(moved.scores, reference.scores, rtol=0, atol=1e-6)
        # the tile attention is reported in the orientation the regions were given in
        expected = pose(torch.from_numpy(reference.tile_attention), flip, turns).numpy()
        np.testing.assert_allclose(moved.tile_attention, expected, rtol=0, atol=1e-6)
    # the end-to-end engine's TTA evaluation averages the same 8 poses
    from hipt_e2e.training.e2e import slide_probabilities

    chunk = {"slide_id": "s", "pixels": torch.stack([torch.from_numpy(rgb).permute(2, 0, 1) for _, _, rgb in regions]),
             "tissue": torch.ones(len(regions), 4, 4)}
    engine = slide_probabilities(model, [chunk], torch.device("cpu"), 0.0, contextlib.nullcontext, tta_poses("dihedral"))
    np.testing.assert_allclose(engine["s"], reference.probs, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="tta must be one of"):
        Predictor([(model, None)], ["a", "b"], tta="octagonal")
