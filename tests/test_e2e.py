"""End-to-end fine-tuning (recipes/e2e.py, hipt_e2e.training.e2e) with the real tiny preset on generated
region shards: memory-saving paths, freeze modes, seeded region sampling, 2 processes = 1 process,
exact resume, and the embedded default."""
from __future__ import annotations

import contextlib
import copy
import csv
import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from hipt_e2e.data import SlideBagStream
from hipt_e2e.data.augment import pose, tta_poses
from hipt_e2e.data.regions import ShardRegions
from hipt_e2e.errors import SettingError
from hipt_e2e.evaluation.splits import make_folds
from hipt_e2e.models import load_checkpoint, model_preset, vit256
from hipt_e2e.training.checkpointing import CHECKPOINT, TRAIN_LOG, export_safetensors, load_checkpoint_state
from hipt_e2e.training.e2e import (
    E2EOptim,
    E2ESettings,
    FoldTrainer,
    build_model,
    param_groups,
    slide_probabilities,
    tile_mask,
)
from tests.launch import launch
from tests.test_models import attention_paths

REPO = Path(__file__).resolve().parents[1]
TINY = model_preset("tiny")


def load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_e2e", REPO / "recipes" / "e2e.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def settings(shards: Path, out: Path, *extra: str) -> list[str]:
    """A few-second run: 3 folds of 4 training slides, 2 regions per step, one thread."""
    return [f"data.shards={shards}", f"out={out}", "data.regions_per_slide=2", "train.epochs=2", "train.grad_accum=1",
            "train.mixed_precision=no", "train.log_every=1000", *extra]


def tiny_cfg(**model: object) -> E2ESettings:
    return E2ESettings().with_changes(**{f"model.{key}": value for key, value in model.items()})


def test_memory_saving_paths_give_the_same_gradients_and_predictions(shards: Path) -> None:
    regions = ShardRegions(shards, regions_per_slide=None, seed=0)
    slide = next(iter(regions.slides))
    item = regions[regions.chunks(slide, 100)[0]]
    mask = tile_mask(item["tissue"], 0.9)
    assert mask is not None and 0 < mask.sum() < mask.numel()  # the glass half of the slide is skipped

    def gradients(chunks: bool, blocks: bool, chunk_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = build_model(tiny_cfg(dropout=0.0), 2)
        model.chunk_size = chunk_size
        model.set_grad_checkpointing(chunks=chunks, blocks=blocks)
        logits = model(item["pixels"], mask)
        logits[0, 1].backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    plain_logits, plain = gradients(False, False, 1000)
    for chunks, blocks, size in ((True, False, 7), (True, True, 5), (False, True, 1000)):
        logits, saved = gradients(chunks, blocks, size)
        torch.testing.assert_close(logits, plain_logits, rtol=1e-5, atol=1e-6)
        assert saved.keys() == plain.keys()
        for name, grad in plain.items():
            torch.testing.assert_close(saved[name], grad, rtol=1e-4, atol=1e-6, msg=name)

    # Evaluation: every region, a bounded number at a time, equals the whole slide at once.
    torch.manual_seed(0)
    model = build_model(tiny_cfg(), 2).eval()
    chunked = slide_probabilities(model, (regions[key] for key in regions.chunks(slide, 1)), torch.device("cpu"),
                                  0.0, contextlib.nullcontext)
    with torch.no_grad():
        whole = model(item["pixels"]).softmax(-1)[0]
    torch.testing.assert_close(torch.from_numpy(chunked[slide]), whole, rtol=1e-5, atol=1e-6)

    # Test-time augmentation over the 8 poses: a slide whose regions (and tissue grids) are all mirrored
    # is scored alike, up to the order of the 8-term mean; the skipped-tile mask turns with its tiles.
    poses = tta_poses("dihedral")
    mirrored = [{**regions[key], "pixels": pose(regions[key]["pixels"], True, 0),
                 "tissue": pose(regions[key]["tissue"], True, 0)} for key in regions.chunks(slide, 2)]
    kept = slide_probabilities(model, (regions[key] for key in regions.chunks(slide, 2)), torch.device("cpu"), 0.9,
                               contextlib.nullcontext, poses)
    turned = slide_probabilities(model, iter(mirrored), torch.device("cpu"), 0.9, contextlib.nullcontext, poses)
    np.testing.assert_allclose(turned[slide], kept[slide], rtol=0, atol=1e-6)
    plain = slide_probabilities(model, iter(mirrored), torch.device("cpu"), 0.9, contextlib.nullcontext)
    assert not np.allclose(plain[slide], kept[slide], atol=1e-4)


def test_region_sampling_is_seeded_and_matches_the_slide_stream(shards: Path) -> None:
    regions = ShardRegions(shards, regions_per_slide=2, seed=3)
    again = ShardRegions(shards, regions_per_slide=2, seed=3)
    slides = sorted(regions.slides)
    drawn = {epoch: [regions.sample(s, epoch) for s in slides] for epoch in range(4)}
    assert drawn[0] == [again.sample(s, 0) for s in slides]
    assert all(len(positions) == 2 for _, positions in drawn[0])
    assert len({tuple(keys) for keys in drawn.values()}) > 1  # epochs draw other regions
    assert ShardRegions(shards, regions_per_slide=9, seed=3).sample(slides[0], 0)[1] == (0, 1, 2, 3)  # all when fewer
    # The same regions, decoded identically, as the sequential slide-bag stream gives for (seed, epoch).
    stream = SlideBagStream(shards, regions_per_slide=2, seed=3)
    stream.set_epoch(2)
    for bag in stream:
        mine = regions[regions.sample(bag["slide_id"], 2)]
        assert torch.equal(mine["pixels"], bag["pixels"]) and torch.equal(mine["region_index"], bag["region_index"])
        assert torch.equal(mine["tissue"], bag["tissue"]) and mine["label_index"] == bag["label_index"]


def test_learning_rates_per_stage_with_layer_decay() -> None:
    model = build_model(tiny_cfg(freeze_region=False), 2)
    optim = E2EOptim.from_mapping({"lr": {"tile": 1e-4, "region": 2e-4, "slide": 3e-4}, "layer_decay": 0.5,
                                   "weight_decay": 0.05})
    lr = {id(p): (g["lr"], g["weight_decay"]) for g in param_groups(model, optim) for p in g["params"]}
    tile = model.tile_encoder  # depth 2: embeddings layer 0, blocks 1-2, final norm 3
    assert lr[id(tile.patch_embed.proj.weight)] == (1e-4 * 0.5 ** 3, 0.05)
    assert lr[id(tile.blocks[1].mlp.fc1.weight)] == (1e-4 * 0.5, 0.05)
    assert lr[id(tile.norm.bias)] == (1e-4, 0.0)
    assert lr[id(model.region_encoder.blocks[0].attn.qkv.weight)] == (2e-4, 0.05)
    assert lr[id(model.slide_model.classifier.bias)] == (3e-4, 0.0)
    model.set_frozen(tile=True)
    assert not {id(p) for p in tile.parameters()} & {id(p) for g in param_groups(model, optim) for p in g["params"]}


@pytest.mark.parametrize("encoder, freeze", [("vit", ("tile",)), ("vit", ("tile", "region")), ("cnn", ("tile",))])
def test_freeze_modes_leave_frozen_parameters_unchanged(shards: Path, tmp_path: Path, encoder: str,
                                                        freeze: tuple[str, ...]) -> None:
    # The tile encoder starts from a file in the layout of the DINO exports (released key names).
    cfg = tiny_cfg(encoder=encoder, cnn="resnet10t")
    torch.manual_seed(1)
    initial_tile = build_model(cfg, 2).tile_encoder
    export_safetensors(initial_tile, tmp_path / "tile.safetensors")
    if encoder == "vit":
        assert "blocks.0.attn.qkv.weight" in load_file(tmp_path / "tile.safetensors")
    overrides = [f"model.encoder={encoder}", "model.cnn=resnet10t", f"model.weights.tile={tmp_path / 'tile.safetensors'}",
                 *[f"model.freeze_{stage}=true" for stage in freeze], "optim.lr.region=0.01", "train.stop_after=2"]
    assert load_recipe().main(settings(shards, tmp_path / "run", *overrides)) is None  # stopped after 2 steps

    state = load_checkpoint_state(tmp_path / "run" / "fold_0" / CHECKPOINT)
    torch.manual_seed(0)  # seed + fold: the initial weights of fold 0
    start = build_model(cfg.with_changes(**{"model.weights.tile": str(tmp_path / "tile.safetensors")}), 2)
    for name, tensor in start.state_dict().items():  # parameters and buffers (BatchNorm statistics)
        frozen = name.split("_")[0] in freeze  # tile_encoder.* / region_encoder.* / slide_model.*
        if frozen:
            assert torch.equal(state["model"][name], tensor), name
    for stage in ("tile", "region", "slide"):
        module = start.stage(stage)
        prefix = {"tile": "tile_encoder.", "region": "region_encoder.", "slide": "slide_model."}[stage]
        moved = any(not torch.equal(state["model"][prefix + n], p) for n, p in module.named_parameters())
        assert moved == (stage not in freeze), stage
    trained = {name for group in state["optimizer"]["param_groups"] for name in group["params"]}
    assert not any(name.startswith(tuple(f"{s}_" for s in freeze)) for name in trained)


def test_the_demo_on_two_machines_is_one_run_of_two_processes(tmp_path: Path) -> None:
    """The demo path (no data.shards: the main process makes the data first) launched as two CPU machines:
    one run of 2 processes, not two lone processes writing one folder (a `PartialState()` made before the
    Accelerator ignored ACCELERATE_USE_CPU: rank 1 then died at its first checkpoint)."""
    demo = [f"demo.dir={tmp_path}", "demo.slides_per_class=6", "demo.size=256", "train.epochs=1",
            "train.log_every=1000", "data.regions_per_slide=2"]
    result = launch("recipes/e2e.py", demo, machines=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 per process x 2 processes" in result.stderr
    with open(tmp_path / "e2e" / "predictions.csv", newline="") as rows:
        assert sorted(row["slide_id"] for row in csv.DictReader(rows)) == sorted(
            path.stem for path in (tmp_path / "slides").rglob("*.png"))


def test_two_processes_on_two_machines_equal_one_process_on_the_same_global_batch(shards: Path, tmp_path: Path) -> None:
    """2 machines (two launchers on 127.0.0.1) x 1 process x 1 slide per step (DDP) = 1 process accumulating
    2 slides, dropout and augmentation included."""
    step = ["train.stop_after=1", "optim.lr.tile=0.01", "optim.lr.region=0.01", "optim.lr.slide=0.01",
            "optim.clip_grad=0", "model.dropout=0.25", "model.drop_path_rate=0.1", "augment.enabled=true"]
    result = launch("recipes/e2e.py", settings(shards, tmp_path / "two", *step), machines=2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 per process x 2 processes" in result.stderr
    recipe = load_recipe()
    recipe.main(settings(shards, tmp_path / "one", *step, "train.grad_accum=2"))
    recipe.main(settings(shards, tmp_path / "other", *step))  # another global batch: the first slide only
    two, one, other = (load_checkpoint_state(tmp_path / run / "fold_0" / CHECKPOINT) for run in ("two", "one", "other"))
    assert two["steps"] == one["steps"] == 1

    rounding = 1e-4  # fp32: both sum the same terms in another order; K <= ~600 terms per dot product: K u < 4e-5
    blind = "slide_model.global_attn_pool.attention_c.bias"  # zero gradient in exact arithmetic: softmax is blind to it

    def close(a: dict, b: dict) -> bool:
        """The same averaged gradient and the same AdamW step, as far as the maths defines them. Gradients
        (the first moment after one step is (1 - beta1) g; a sum instead of a mean doubles it) to `rounding`
        of each tensor's largest entry; attention_c's bias, all rounding noise, only to the rounding of the
        slide model's gradients. Step one of AdamW moves p by lr * g / (|g| + eps): with g known to within
        delta, to within lr * delta * eps / (|g| - delta + eps)^2 where |g| > delta, and to 2 lr where the
        sign of g is rounding (e.g. key biases); plus the rounding of p."""
        moments_a, moments_b = a["optimizer"]["state"], b["optimizer"]["state"]
        slide_scale = max(moments_b[n]["exp_avg"].abs().max().item() for n in moments_b if n.startswith("slide_model."))
        for group in b["optimizer"]["param_groups"]:
            lr, eps, beta1 = group["lr"], group["eps"], group["betas"][0]
            for name in group["params"]:
                expected, got = moments_b[name]["exp_avg"], moments_a[name]["exp_avg"]
                g = expected.abs() / (1 - beta1)
                if name == blind:
                    if max(expected.abs().max().item(), got.abs().max().item()) > rounding * slide_scale:
                        return False
                    g = torch.zeros_like(g)
                elif not torch.allclose(got, expected, rtol=0, atol=rounding * expected.abs().max().item()):
                    return False
                delta = rounding * g.max().item()
                step = torch.where(g > delta, lr * delta * eps / (g - delta + eps).clamp(min=eps) ** 2, 2 * lr)
                p = b["model"][name]
                if ((a["model"][name] - p).abs() > step.clamp(max=2 * lr) + rounding * p.abs().max().item()).any():
                    return False
        return True

    assert close(two, one)
    assert not close(other, one)  # the tolerance does tell one global batch from another
    doubled = copy.deepcopy(two)
    for moments in doubled["optimizer"]["state"].values():
        moments["exp_avg"] = moments["exp_avg"] * 2
    assert not close(doubled, one)  # ... and a sum from a mean
    stepped_elsewhere = {**two, "model": other["model"]}
    assert not close(stepped_elsewhere, one)  # ... and the parameters alone a step on another batch


def test_interrupted_and_resumed_run_repeats_the_uninterrupted_one(shards: Path, tmp_path: Path) -> None:
    # 4 training slides x 2 epochs x 3 folds = 24 steps; the run stops inside fold 1's second epoch.
    common = settings(shards, tmp_path, "train.checkpoint_every=3", "model.dropout=0.25", "model.drop_path_rate=0.1",
                      "imbalance=balanced_sampling", "patience=9", "augment.enabled=true", "augment.per=tile")
    recipe = load_recipe()
    whole = recipe.main([*common, f"out={tmp_path / 'whole'}"])
    assert recipe.main([*common, f"out={tmp_path / 'parts'}", "train.stop_after=14"]) is None
    assert not (tmp_path / "parts" / "metrics.json").exists()
    with pytest.raises(FileExistsError, match="resume=true"):
        recipe.main([*common, f"out={tmp_path / 'parts'}"])
    with pytest.raises(ValueError, match="optim.lr.slide"):
        recipe.main([*common, f"out={tmp_path / 'parts'}", "resume=true", "optim.lr.slide=0.1"])
    parts = recipe.main([*common, f"out={tmp_path / 'parts'}", "resume=true"])

    assert parts["summary"] == whole["summary"]
    assert (tmp_path / "parts" / "predictions.csv").read_text() == (tmp_path / "whole" / "predictions.csv").read_text()
    for fold in range(3):
        a, b = (load_checkpoint_state(tmp_path / run / f"fold_{fold}" / CHECKPOINT) for run in ("whole", "parts"))
        assert a["steps"] == b["steps"] == 8
        for name, tensor in a["model"].items():
            assert torch.equal(b["model"][name], tensor), (fold, name)
        logs = [(tmp_path / run / f"fold_{fold}" / TRAIN_LOG).read_text() for run in ("whole", "parts")]
        assert logs[0] == logs[1] and len(logs[0].splitlines()) == 8
        assert json.loads((tmp_path / "parts" / f"fold_{fold}" / "history.json").read_text()) == \
            json.loads((tmp_path / "whole" / f"fold_{fold}" / "history.json").read_text())


def test_slides_sharing_a_call_give_the_slide_by_slide_gradient(shards: Path, tmp_path: Path) -> None:
    """train.slides_per_call batches slides through the tile encoder and ViT4K; without random draws the
    update equals the slide-by-slide one, including an epoch's last, shorter step (4 slides, 3 per step)."""
    regions = ShardRegions(shards, regions_per_slide=2, seed=0)
    items = [regions[regions.sample(slide, 0)] for slide in list(regions.slides)[:3]]
    model = build_model(tiny_cfg(), 3).eval()
    alone = torch.cat([model(item["pixels"]) for item in items])
    together = model(torch.cat([item["pixels"] for item in items]), bag_sizes=[len(item["pixels"]) for item in items])
    assert together.shape == (3, 3) and torch.allclose(together, alone, atol=1e-5)

    step = ["train.stop_after=2", "train.grad_accum=3", "model.dropout=0", "model.drop_path_rate=0", "optim.clip_grad=0"]
    recipe = load_recipe()
    for per_call in (1, 3):
        recipe.main(settings(shards, tmp_path / f"per_call_{per_call}", *step, f"train.slides_per_call={per_call}"))
    one, three = (load_checkpoint_state(tmp_path / f"per_call_{n}" / "fold_0" / CHECKPOINT) for n in (1, 3))
    assert one["steps"] == three["steps"] == 2
    # gradients agree to rounding (bf16-free fp32 sums in another order), measured on the largest entry's scale:
    # some tensors (attention pooling over a one-region slide) have only rounding noise for a gradient
    scale = max(m["exp_avg"].abs().max().item() for m in one["optimizer"]["state"].values())
    for name, moments in one["optimizer"]["state"].items():
        assert torch.allclose(three["optimizer"]["state"][name]["exp_avg"], moments["exp_avg"], rtol=0,
                              atol=1e-4 * scale), name
    logs = [[json.loads(line)["loss"] for line in (tmp_path / f"per_call_{n}" / "fold_0" / TRAIN_LOG).read_text().splitlines()]
            for n in (1, 3)]
    assert logs[0] == pytest.approx(logs[1], abs=1e-5)
    with pytest.raises(ValueError, match="slides_per_call=2 must divide train.grad_accum=3"):
        recipe.main(settings(shards, tmp_path / "bad", *step, "train.slides_per_call=2"))


@pytest.mark.parametrize("precision, fused", [("bf16", False), ("no", True)])
def test_trainer_chooses_the_attention_path_for_its_precision(shards: Path, tmp_path: Path, precision: str,
                                                               fused: bool) -> None:
    """On CPUs under bf16 the fold's model, its evaluation copy and the tile encoder run timm's explicit
    attention (benchmarks/bench_cpu_attention.py); in fp32 torch's fused kernel."""
    cfg = tiny_cfg().with_changes(**{"data.shards": str(shards), "out": str(tmp_path)})
    regions = ShardRegions(shards, regions_per_slide=2, seed=0)
    fold = make_folds(regions.infos(), 3, 0)[0]
    AcceleratorState._reset_state(reset_partial_state=True)  # the process-wide precision is set once per state
    try:
        trainer = FoldTrainer(Accelerator(mixed_precision=precision), cfg, regions, regions.manifest["classes"], fold,
                              tmp_path / "fold_0", 0)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    for model in (trainer.accelerator.unwrap_model(trainer.model), trainer.eval_model):
        assert attention_paths(model) == {fused}


def test_augmentation_trains_but_never_evaluates(shards: Path, tmp_path: Path) -> None:
    """With every learning rate 0 the weights never move: augmentation changes the training losses, while
    validation and test predictions stay identical to the run without it."""
    frozen_weights = ["optim.lr.tile=0", "optim.lr.region=0", "optim.lr.slide=0", "train.epochs=1", "folds=3"]
    recipe = load_recipe()
    for name, enabled in (("plain", "false"), ("augmented", "true")):
        recipe.main(settings(shards, tmp_path / name, *frozen_weights, f"augment.enabled={enabled}",
                             "augment.hed_scale=0.2", "augment.brightness=0.3"))
    plain, augmented = ((tmp_path / name / "fold_0" / TRAIN_LOG).read_text().splitlines() for name in ("plain", "augmented"))
    assert [json.loads(line)["loss"] for line in plain] != [json.loads(line)["loss"] for line in augmented]
    assert (tmp_path / "plain" / "predictions.csv").read_text() == (tmp_path / "augmented" / "predictions.csv").read_text()
    history = [json.loads((tmp_path / name / "fold_0" / "history.json").read_text())[0] for name in ("plain", "augmented")]
    assert history[0]["val_loss"] == history[1]["val_loss"]
    assert json.loads((tmp_path / "augmented" / "metrics.json").read_text())["augment"]["hed_scale"] == 0.2


def test_embedded_default_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The no-argument demo, reduced: a smaller synthetic set and one epoch."""
    demo = tmp_path / "demo"
    metrics = load_recipe().main([f"demo.dir={demo}", "demo.slides_per_class=6", "demo.size=256", "train.epochs=1",
                                  "train.mixed_precision=no"])
    assert f"report: {demo / 'e2e' / 'report.md'}" in capsys.readouterr().out
    assert metrics["n_folds"] == 3 and metrics["mode"] == "end to end"
    rows = list(csv.DictReader(open(demo / "e2e" / "predictions.csv")))
    assert len(rows) == 12 and {row["true_label"] for row in rows} == {"class_a", "class_b"}
    assert "![learning curves](learning_curves.png)" in (demo / "e2e" / "report.md").read_text()
    for name in ("report.md", "metrics.json", "roc.png", "confusion_matrix.png", "splits.csv", "config.yaml",
                 "learning_curves.png",
                 "fold_2/best_model.safetensors", "fold_0/history.json", "fold_1/train_log.jsonl"):
        assert (demo / "e2e" / name).exists(), name
    assert (demo / "slides" / "labels.csv").exists() and (demo / "shards" / "manifest.json").exists()
    # The selected model: the nested HIPT's names; its tile encoder loads as a tile encoder.
    build_model(tiny_cfg(), 2).load_state_dict(load_file(demo / "e2e" / "fold_2" / "best_model.safetensors"))
    load_checkpoint(vit256(**TINY["tile"]), demo / "e2e" / "fold_2" / "best_model.safetensors",
                    prefix="tile_encoder.", strict=True)


@pytest.mark.parametrize("override, message", [
    ("train.grad_accum=0", "train.grad_accum: must be >= 1, got 0"),
    ("augment.per=slide", "augment.per: choose one of ['region', 'tile'], got 'slide'"),
    ("imbalance=oversample", "imbalance: choose one of ['none', 'weighted_loss', 'balanced_sampling']"),
    ("model.lora.rank=-1", "model.lora.rank: must be >= 0, got -1"),
])
def test_a_bad_setting_fails_at_the_start_naming_its_key(tmp_path: Path, override: str, message: str) -> None:
    """Refused when the settings are read: before any shard is opened (these do not exist) or a fold trains."""
    with pytest.raises(SettingError, match=re.escape(message)):
        load_recipe().main(settings(tmp_path / "absent", tmp_path / "run", override))
    assert not (tmp_path / "run").exists()
