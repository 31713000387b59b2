"""The four staged-path recipes (DINO on tiles, embed tiles, DINO on token grids, embed regions) on
generated shards with the tiny geometry: end to end, exact resume, 2 processes = 1 process on the same
global batch, and a clean stop on a non-finite loss."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from hipt_e2e.config import resolve_settings
from hipt_e2e.data import RegionStream, SlideBagStream, load_manifest
from hipt_e2e.data.embeddings import read_slide_bags
from hipt_e2e.data.samples import encode_grid
from hipt_e2e.data.writer import ShardSetWriter, UnitShards
from hipt_e2e.embedding import GRIDS_KIND, EmbedRegionsSettings, EmbedTilesSettings
from hipt_e2e.errors import SettingError
from hipt_e2e.evaluation.splits import Fold
from hipt_e2e.models import cnn256, load_checkpoint, model_preset, token_grids, vit4k, vit256
from hipt_e2e.models.bundle import CARD, load_bundle, write_card
from hipt_e2e.models.encoders import BACKBONE_EXPORT
from hipt_e2e.training.checkpointing import CHECKPOINT, TRAIN_LOG, NonFiniteLossError, export_safetensors, load_checkpoint_state
from hipt_e2e.training.dino import RegionPretraining, TilePretraining
from hipt_e2e.training.rescore import pixel_shards
from hipt_e2e.training.slide_level import SlideSettings, build_slide_model, embedding_stages, slide_model_card
from shards.build import BuildSettings, build
from shards.verify import verify
from tests.launch import launch

REPO = Path(__file__).resolve().parents[1]
TINY = model_preset("tiny")


def run_recipe(name: str, *overrides: str) -> None:
    """Run recipes/NAME.py in this process with its tiny config (as `python recipes/NAME.py` would)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--config", str(REPO / "recipes" / "configs" / "tiny" / f"{name}.yaml"), *overrides])


def train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(synthetic_slides: Path, tmp_path_factory) -> dict[str, Path]:
    """Two shard sets of the 8 synthetic slides: 64 px regions of 2 x 2 tiles, one region per shard (so
    that which process reads what is known), and 128 px regions of 4 x 4 tiles, slides across shards."""
    root = tmp_path_factory.mktemp("dino_shards")
    common = {"kind": "images", "input": str(synthetic_slides), "labels": str(synthetic_slides / "labels.csv"),
              "slide_mpp": 0.5, "tile_px": 32, "encoding": "png"}
    build(BuildSettings.from_mapping({**common, "out": str(root / "tiles"), "region_px": 64, "shard_bytes": 1}))
    build(BuildSettings.from_mapping({**common, "out": str(root / "regions"), "region_px": 128, "shard_bytes": 100_000}))
    return {"tiles": root / "tiles", "regions": root / "regions"}


STAGED_SETTINGS = {"pretrain_vit256": TilePretraining, "pretrain_vit4k": RegionPretraining,
                   "embed_tiles": EmbedTilesSettings, "embed_regions": EmbedRegionsSettings}


def test_the_recipes_config_files_resolve_to_their_settings() -> None:
    configs = REPO / "recipes" / "configs"
    files = {"lymphoma_pretrain_vit256": "pretrain_vit256"} | {name: name for name in STAGED_SETTINGS}
    for folder in (configs, configs / "tiny"):
        for name, recipe in files.items():
            if (folder / f"{name}.yaml").exists():
                resolve_settings(STAGED_SETTINGS[recipe], folder / f"{name}.yaml")


@pytest.mark.parametrize(("recipe", "override", "message"), [
    ("pretrain_vit256", "optim.name=lamb", r"optim.name: choose one of \['adamw', 'sgd'\], got 'lamb'"),
    ("pretrain_vit4k", "crops.n_local=-1", "crops.n_local: must be >= 0, got -1"),
    ("embed_tiles", "embed.dtype=float64", "embed.dtype: choose one of"),
    ("embed_regions", "model.region.depth=two", "model.region.depth: expected int"),
])
def test_a_bad_setting_fails_at_the_start_naming_its_key(recipe: str, override: str, message: str,
                                                         tmp_path: Path) -> None:
    with pytest.raises(SettingError, match=message):
        run_recipe(recipe, f"data.shards={tmp_path / 'absent'}", f"out={tmp_path / 'out'}", override)
    assert not (tmp_path / "out").exists()


def test_four_recipes_end_to_end(shards: dict[str, Path], tmp_path: Path) -> None:
    regions = shards["regions"]
    source = load_manifest(regions)
    assert any(shard["slide_continues"] for shard in source["shards"])  # slides span shards

    run_recipe("pretrain_vit256", f"data.shards={regions}", f"out={tmp_path / 'vit256'}", "train.steps_per_epoch=2")
    log = train_log(tmp_path / "vit256")
    assert [entry["step"] for entry in log] == [0, 1, 2, 3] and all(np.isfinite(e["loss"]) for e in log)
    # The exports: released key names in safetensors, and the DINO layout (teacher, backbone. keys).
    tile_encoder = vit256(**TINY["tile"])
    load_checkpoint(tile_encoder, tmp_path / "vit256" / BACKBONE_EXPORT, strict=True)
    from_dino_layout = vit256(**TINY["tile"])
    load_checkpoint(from_dino_layout, tmp_path / "vit256" / CHECKPOINT, strict=True)
    for name, tensor in tile_encoder.state_dict().items():
        torch.testing.assert_close(from_dino_layout.state_dict()[name], tensor, rtol=0, atol=0)

    grids_dir = tmp_path / "grids"
    run_recipe("embed_tiles", f"data.shards={regions}", f"model.weights={tmp_path / 'vit256' / BACKBONE_EXPORT}",
               f"out={grids_dir}")
    grids = load_manifest(grids_dir)
    assert grids["kind"] == GRIDS_KIND and grids["samples"] == grids["inputs"] == source["samples"]
    assert {k: v["regions"] for k, v in grids["slides"].items()} == {k: v["regions"] for k, v in source["slides"].items()}
    assert verify(grids_dir) == []
    # Every region's grid holds its tiles' embeddings in raster order, with its record kept.
    tile_encoder.eval()
    embedded = {(i["record"]["slide_id"], i["record"]["region_index"]): i for i in RegionStream(grids_dir)}
    assert len(embedded) == source["samples"]
    for item in list(RegionStream(regions))[:3]:
        grid = embedded[(item["record"]["slide_id"], item["record"]["region_index"])]
        assert grid["pixels"].shape == (48, 4, 4) and (grid["record"]["x"], grid["record"]["y"]) == (
            item["record"]["x"], item["record"]["y"])
        with torch.no_grad():
            expected = token_grids(tile_encoder, item["pixels"][None], 32, "hipt", tiles_per_call=7)[0]
            tile = item["pixels"][:, 32:64, 64:96]  # row 1, column 2
            direct = tile_encoder((tile[None].float() / 127.5) - 1)[0]
        torch.testing.assert_close(grid["pixels"], expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grid["pixels"][:, 1, 2], direct, rtol=1e-4, atol=1e-5)

    run_recipe("pretrain_vit4k", f"data.shards={grids_dir}", f"out={tmp_path / 'vit4k'}", "train.steps_per_epoch=2")
    load_checkpoint(vit4k(**TINY["region"]), tmp_path / "vit4k" / BACKBONE_EXPORT, strict=True)

    slides_dir = tmp_path / "slides"
    run_recipe("embed_regions", f"data.shards={grids_dir}", f"model.weights={tmp_path / 'vit4k' / BACKBONE_EXPORT}",
               f"out={slides_dir}")
    bags, classes = read_slide_bags(slides_dir)
    assert classes == source["classes"] and len(bags) == len(source["slides"])
    assert sum(len(bag.features) for bag in bags) == source["samples"]
    coords = {}
    for item in RegionStream(regions):
        coords.setdefault(item["record"]["slide_id"], []).append((item["record"]["x"], item["record"]["y"]))
    for bag in bags:
        assert bag.features.shape == (source["slides"][bag.slide_id]["regions"], 24)
        assert [tuple(xy) for xy in bag.coords.tolist()] == coords[bag.slide_id]
    for out in ("vit256", "grids", "vit4k", "slides"):
        assert (tmp_path / out / "config.yaml").exists()

    # The exports describe themselves, and a slide model trained on these bags finds its encoders through the
    # configs the embedding recipes recorded: its bundle embeds a region shard's slide as the bags hold it.
    tile_card = json.loads((tmp_path / "vit256" / CARD).read_text())
    assert tile_card["kind"] == "tile_encoder" and tile_card["architecture"] == {"encoder": "vit", **TINY["tile"]}
    assert json.loads((tmp_path / "vit4k" / CARD).read_text())["architecture"] == TINY["region"]
    stages = embedding_stages(slides_dir)
    assert Path(pixel_shards(str(slides_dir))).resolve() == regions.resolve()  # what a staged run is rescored on
    assert stages["tile"]["weights"] == str((tmp_path / "vit256" / BACKBONE_EXPORT).resolve())
    assert (stages["tile_px"], stages["region_px"], stages["normalisation"]) == (32, 128, "hipt")
    cfg = SlideSettings.from_mapping({"model": {"name": "vit_wsi", "dropout": 0.0, "hidden": None},
                                      "data": {"shards": str(slides_dir)}, "vote": "majority"})
    slide_model = build_slide_model(cfg.model, len(classes), 24)
    export_safetensors(slide_model, tmp_path / "wsi" / "best_model.safetensors")
    write_card(tmp_path / "wsi" / "best_model.safetensors", slide_model_card(cfg, classes, 24, Fold(0, (), (), ()), {}))
    bundle = load_bundle(tmp_path / "wsi")
    bag = bags[0]
    item = next(b for b in SlideBagStream(regions) if b["slide_id"] == bag.slide_id)
    with torch.no_grad():
        torch.testing.assert_close(bundle.model(item["pixels"]), slide_model.eval()(bag.features), rtol=1e-4, atol=1e-5)


def test_cnn_tile_encoder_runs_through_the_same_recipe(shards: dict[str, Path], tmp_path: Path) -> None:
    run_recipe("pretrain_vit256", f"data.shards={shards['tiles']}", f"out={tmp_path}", "model.encoder=cnn",
               "model.cnn=resnet10t", "train.epochs=1", "train.steps_per_epoch=1")
    load_checkpoint(cnn256("resnet10t", embed_dim=48), tmp_path / BACKBONE_EXPORT, strict=True)


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_one(shards: dict[str, Path], tmp_path: Path) -> None:
    # Three 4-tile shards and 2 x 4 tiles per step: every step starts a new pass over the data, so the
    # resumed run must also restore each pass's position; two micro-batches exercise accumulation.
    few = "[" + ",".join(str(shards["tiles"] / s["name"]) for s in load_manifest(shards["tiles"])["shards"][:3]) + "]"
    settings = [f"data.shards={few}", "train.batch_size=4", "train.grad_accum=2", "train.steps_per_epoch=3",
                "data.shuffle=8", "dino.freeze_last_layer=1", "dino.drop_path_rate=0.1"]
    run_recipe("pretrain_vit256", *settings, f"out={tmp_path / 'whole'}")
    run_recipe("pretrain_vit256", *settings, f"out={tmp_path / 'parts'}", "train.stop_after=4")
    assert len(train_log(tmp_path / "parts")) == 4 and not (tmp_path / "parts" / BACKBONE_EXPORT).exists()
    with pytest.raises(FileExistsError, match="resume=true"):
        run_recipe("pretrain_vit256", *settings, f"out={tmp_path / 'parts'}")
    with pytest.raises(ValueError, match="optim.lr"):
        run_recipe("pretrain_vit256", *settings, f"out={tmp_path / 'parts'}", "resume=true", "optim.lr=0.1")
    run_recipe("pretrain_vit256", *settings, f"out={tmp_path / 'parts'}", "resume=true")

    whole, parts = train_log(tmp_path / "whole"), train_log(tmp_path / "parts")
    assert [e["step"] for e in parts] == list(range(6))
    assert [e["loss"] for e in parts] == [e["loss"] for e in whole]
    final_whole = load_checkpoint_state(tmp_path / "whole" / CHECKPOINT)
    final_parts = load_checkpoint_state(tmp_path / "parts" / CHECKPOINT)
    for name, tensor in final_whole["teacher"].items():
        assert torch.equal(final_parts["teacher"][name], tensor), name
    assert torch.equal(final_parts["dino_loss"]["center"], final_whole["dino_loss"]["center"])


def test_two_processes_on_two_machines_match_one_process_on_the_same_global_batch(shards: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    # Two launchers on 127.0.0.1 (machine ranks 0 and 1), one process each. One region (4 tiles) per shard:
    # rank r's first batch of 4 is shard r, one process's batch of 8 is shards 0 and 1. Crops are drawn per
    # chunk of 4 by place in the global batch, so both see the same.
    step = [f"data.shards={shards['tiles']}", "train.epochs=1", "train.steps_per_epoch=1", "train.augment_chunk=4",
            "optim.lr=2.0"]
    result = launch("recipes/pretrain_vit256.py",
                    ["--config", str(REPO / "recipes" / "configs" / "tiny" / "pretrain_vit256.yaml"), *step,
                     "train.batch_size=4", f"out={tmp_path / 'two'}"], machines=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 per process x 2 processes" in result.stderr
    run_recipe("pretrain_vit256", *step, "train.batch_size=8", f"out={tmp_path / 'one'}")

    two, one = (load_checkpoint_state(tmp_path / run / CHECKPOINT) for run in ("two", "one"))
    assert two["data_positions"] == [[0, 1], [0, 1]]
    assert_same_dino_step(two, one)


# fp32 rounding between the two runs, relative to a tensor's largest entry: both sum the same terms in
# another order (batch 4 + all-reduce vs batch 8, other GEMM blockings and vector widths). A K-term dot
# product is off by at most K u (u = 2^-24; K <= 256 here: 1.5e-5), and the step composes a few of them;
# measured here: 1.6e-6. A wrong batch, crop or reduction changes these values by O(1) of that entry.
ROUNDING = 1e-4


def assert_same_dino_step(two: dict, one: dict) -> None:
    """Two DINO checkpoints after one step from the same start hold the same step, as far as the maths
    defines it: the teacher centre and AdamW's moments to rounding, then every parameter within the
    bound that its own gradient implies for the AdamW step (entries whose gradient is zero in exact
    arithmetic, e.g. the key biases to which softmax is blind, are only bounded by the lr)."""
    center = one["dino_loss"]["center"]
    torch.testing.assert_close(two["dino_loss"]["center"], center, rtol=0, atol=ROUNDING * center.abs().max().item())
    bounds, defined = {}, []
    for group in one["optimizer"]["param_groups"]:
        beta1, lr, eps = group["betas"][0], group["lr"], group["eps"]
        for index, name in zip(group["params"], group["names"]):
            moments, other = one["optimizer"]["state"][index], two["optimizer"]["state"][index]
            for moment in ("exp_avg", "exp_avg_sq"):
                scale = moments[moment].abs().max().item()
                torch.testing.assert_close(other[moment], moments[moment], rtol=0, atol=ROUNDING * scale,
                                           msg=f"{moment} of {name}")
            # Step one of AdamW moves p by lr * f(g), f(g) = g / (|g| + eps), with g = exp_avg / (1 - beta1).
            # With g known to within delta, f is known to within delta * f'(|g| - delta) = delta * eps /
            # (|g| - delta + eps)^2 where |g| > delta; where the sign of g is rounding (|g| <= delta), to 2.
            g = moments["exp_avg"].abs() / (1 - beta1)
            delta = ROUNDING * g.max().item()
            f_bound = torch.where(g > delta, delta * eps / (g - delta + eps).clamp(min=eps) ** 2, torch.full_like(g, 2.0))
            bounds[name] = lr * f_bound.clamp(max=2.0)
            defined.append((g > delta).float().mean().item())
    assert min(defined) > 0 and sum(defined) / len(defined) > 0.9  # the sign-defined entries are nearly all
    moved = max((one["student"][k] - one["teacher"][k]).abs().max().item() for k in one["student"])
    assert moved > 0.05  # the step is large next to every bound below: a wrong step cannot hide in them
    for model in ("student", "teacher"):  # the teacher moves by (1 - momentum) of the student's step
        for name, tensor in one[model].items():
            bound = bounds.get(name, torch.zeros_like(tensor)) + ROUNDING * tensor.abs().max().item()
            excess = ((two[model][name] - tensor).abs() - bound).max().item()
            assert excess <= 0, f"{model} {name}: off by {excess:.3g} beyond the bound its gradient implies"


def _grid_shards(out: Path, grids: np.ndarray) -> Path:
    """A token-grid shard set holding ``grids`` as the regions of one slide."""
    writer = UnitShards(ShardSetWriter(out, settings={}))
    writer.shard_set.resume()
    for index, grid in enumerate(grids):
        record = {"slide_id": "s", "patient_id": "p", "label": "a", "label_index": 0, "split": None,
                  "region_index": index, "x": 0, "y": 0, "height": 4, "width": 4, "grid": [4, 4], "tissue": [1.0] * 16}
        ext, data = encode_grid(grid)
        writer.add(0, {"__key__": f"r{index:04d}", ext: data, "json": json.dumps(record).encode()}, record, 1)
    writer.close(0, len(grids))
    writer.finish(GRIDS_KIND, ["a"], inputs=len(grids), units=1)
    return out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    grids = np.random.default_rng(0).normal(size=(16, 48, 4, 4)).astype(np.float32)
    grids[9, :, 2, 2] = np.nan  # in the third batch of 4
    source = _grid_shards(tmp_path / "grids", grids)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="at step 2 .*Last good checkpoint: .*after step 2"):
        run_recipe("pretrain_vit4k", f"data.shards={source}", f"out={out}", "train.batch_size=4",
                   "train.steps_per_epoch=4", "crops.global_size=4")
    assert [entry["step"] for entry in train_log(out)] == [0, 1]
    state = load_checkpoint_state(out / CHECKPOINT)
    assert state["step"] == 2
    assert all(torch.isfinite(t).all() for t in [*state["student"].values(), *state["teacher"].values()])
    assert not (out / BACKBONE_EXPORT).exists()


def test_knn_evaluation_pieces() -> None:
    from hipt_e2e.evaluation.knn import colour_histograms, cross_validated_accuracy, knn_classifier, linear_probe

    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, 20, 30), dtype=np.uint8)) for _ in range(4)]
    histograms = colour_histograms(images)
    assert histograms.shape == (4, 48)
    # float32 fractions: 16 roundings and 15 additions of values <= 1, each off by <= 2^-24 in any order
    np.testing.assert_allclose(histograms.reshape(4, 3, 16).sum(axis=2), 1.0, rtol=0, atol=16 * 2.0**-24)
    # Two well separated classes: both classifiers are perfect under stratified 5-fold CV.
    labels = np.repeat([0, 1], 25)
    features = rng.normal(size=(50, 8)) + 5 * np.eye(8)[labels]  # class centres along different axes
    for classifier in (lambda: knn_classifier(5), linear_probe):
        assert cross_validated_accuracy(features, labels, classifier) == (1.0, 0.0)
