"""Pretrained tile encoders (hipt_e2e.models.foundation): every registry entry at its architecture, from
random weights written in the authors' layout and format, loaded through the public path, gives timm's
embeddings of the same weights under the model card's transform; refusals; LoRA and partial training."""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from hipt_e2e.errors import SettingError
from hipt_e2e.io import sha256_file as sha256
from hipt_e2e.models import CheckpointError, token_grids
from hipt_e2e.models.encoders import TileModel, TileModelWithWeights, build_tile_encoder, load_encoder_weights
from hipt_e2e.models.foundation import ENCODERS, EncoderEntry, PretrainedTileEncoder, _resolved_layers
from hipt_e2e.models.slide_encoders import SLIDE_ENCODERS
from hipt_e2e.normalise import NORMALISATIONS
from tests.conftest import LYMPHOMA, lymphoma_images, read_rgb

# The suite runs ResNet-50 and one ViT-S/16 whole, the other ViTs at depth 2 (the same blocks, widths,
# tokens and embedding rule, ~10x faster); `pytest -m slow` runs every one at full depth.
FULL_DEPTH_IN_SUITE = {"resnet50", "kaiko-vits16", "ctranspath"}
# fp32 rounding only separates the two paths (normalise-then-resize vs resize-then-normalise, other batch
# layouts): ~1e-6 of the output scale through these depths; a wrong transform moves outputs by > 1e-2.
TOLERANCE = 1e-4


def real_tiles(n: int = 2, px: int = 256) -> torch.Tensor:
    """n uint8 tiles [n, 3, px, px]: real lymphoma H&E (417 x 312 fields) when the data is there, else
    generated pseudo-H&E."""
    if (LYMPHOMA / "CLL").is_dir():
        crops = [read_rgb(path)[:px, :px] for path in lymphoma_images(LYMPHOMA, n)[::n][:n]]
    else:
        from hipt_e2e.data.synthetic import CLASSES, synthetic_slide

        crops = [synthetic_slide(CLASSES[seed % len(CLASSES)], seed, size=2 * px)[:px, :px] for seed in range(n)]
    return torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).contiguous()


def reduced(name: str, depth: int | None) -> EncoderEntry:
    entry = ENCODERS[name]
    return entry if depth is None else dataclasses.replace(entry, kwargs={**entry.kwargs, "depth": depth})


def random_release(name: str, entry, folder: Path) -> tuple[Path, torch.nn.Module]:
    """The timm model of an entry with random, non-trivial weights (LayerScale gammas, tokens and tables
    well away from their near-zero inits), saved as the authors release it; returns (file, that model)."""
    kwargs = {**_resolved_layers(entry.kwargs), "num_classes": 1000 if entry.truncate_after else 0}
    model = timm.create_model(entry.arch, pretrained=False, **kwargs).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key.endswith("gamma") or "token" in key or "pos_embed" in key:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.5 + 0.25)
            elif key.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    state = {key: value.contiguous() for key, value in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    if "model.safetensors" in entry.release.split(" (")[0]:
        path = folder / "model.safetensors"
        save_file(state, path)
    else:
        path = folder / "pytorch_model.bin"
        torch.save(state, path)
    return path, model


def card_reference(model: torch.nn.Module, entry, tiles: torch.Tensor, interpolation: str | None = None,
                   normalisation: str | None = None) -> torch.Tensor:
    """What the model card computes: resize (torchvision), centre crop, normalise, then timm's tokens."""
    mean, std = NORMALISATIONS[normalisation or entry.normalisation]
    mode = InterpolationMode.BICUBIC if (interpolation or entry.interpolation) == "bicubic" else InterpolationMode.BILINEAR
    transform = T.Compose([T.ToDtype(torch.float32, scale=True), T.Resize(entry.resize, interpolation=mode, antialias=True),
                           T.CenterCrop(entry.input_px), T.Normalize(mean, std)])
    x = transform(tiles)
    with torch.no_grad():
        if entry.truncate_after:  # CLAM: the stages to layer3, mean-pooled
            for stage in ("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"):
                x = getattr(model, stage)(x)
            return x.mean(dim=(2, 3))
        if entry.embedding == "pooled":
            return model(x)
        tokens = model.forward_features(x)
        if entry.embedding == "cls+mean":
            return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(1)], dim=-1)
        return tokens[:, 0]


def check_entry(name: str, depth: int | None, tmp_path: Path) -> None:
    entry = reduced(name, depth)
    path, reference = random_release(name, entry, tmp_path / name)
    encoder = PretrainedTileEncoder(name, entry)
    weights = encoder.load_pretrained(path.parent)  # the snapshot folder
    assert weights == {"path": str(path.resolve()), "sha256": sha256(path)}
    tiles = real_tiles()
    region = torch.cat(list(tiles), dim=2)[None]  # one region of 1 x 2 tiles, through the embedding step
    with torch.no_grad():
        grid = token_grids(encoder.eval(), region, 256, entry.normalisation, tiles_per_call=2)
    assert grid.shape == (1, ENCODERS[name].width, 1, 2)
    ours = grid[0].flatten(1).t()
    expected = card_reference(reference, entry, tiles)
    scale = expected.abs().max().item()
    torch.testing.assert_close(ours, expected, rtol=0, atol=TOLERANCE * scale)
    # The test can fail: the two tiles' embeddings differ, and so does a wrong transform.
    assert (expected[0] - expected[1]).abs().max() > 10 * TOLERANCE * scale
    mistakes = [card_reference(reference, entry, tiles, normalisation="imagenet" if entry.normalisation == "hipt" else "hipt")]
    if entry.resize != 256:  # tiles are resized: the interpolation matters
        other = "bilinear" if entry.interpolation == "bicubic" else "bicubic"
        mistakes.append(card_reference(reference, entry, tiles, interpolation=other))
    if entry.resize != entry.input_px:  # resized, then centre cropped: squashing instead is wrong
        mistakes.append(card_reference(reference, dataclasses.replace(entry, resize=entry.input_px), tiles))
    for mistaken in mistakes:
        assert (mistaken - expected).abs().max() > 10 * TOLERANCE * scale


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_every_entry_gives_timm_embeddings_under_its_cards_transform(name: str, tmp_path: Path) -> None:
    check_entry(name, None if name in FULL_DEPTH_IN_SUITE else 2, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(ENCODERS) - FULL_DEPTH_IN_SUITE))
def test_large_entries_at_full_depth(name: str, tmp_path: Path) -> None:
    check_entry(name, None, tmp_path)


def test_widths_and_released_geometry() -> None:
    assert {name: entry.width for name, entry in ENCODERS.items()} == {
        "resnet50": 1024, "uni_v1": 1024, "uni_v2": 1536, "virchow": 2560, "virchow2": 2560, "hoptimus0": 1536,
        "hoptimus1": 1536, "gigapath": 1536, "lunit-vits8": 384, "kaiko-vits16": 384, "kaiko-vits8": 384,
        "kaiko-vitb16": 768, "kaiko-vitb8": 768, "kaiko-vitl14": 1024, "ctranspath": 768}
    virchow2 = PretrainedTileEncoder("virchow2", reduced("virchow2", 1))
    assert virchow2.model.num_prefix_tokens == 5 and virchow2.model.patch_embed.patch_size == (14, 14)
    gigapath = PretrainedTileEncoder("gigapath", reduced("gigapath", 1))
    assert gigapath.model.patch_embed.patch_size == (16, 16) and gigapath.model.pos_embed.shape[1] == 1 + 14 * 14
    uni2 = PretrainedTileEncoder("uni_v2", reduced("uni_v2", 1))
    assert uni2.model.num_prefix_tokens == 9 and uni2.model.pos_embed.shape[1] == 16 * 16  # no_embed_class


def test_ctranspath_gives_tridents_embedding(tmp_path: Path) -> None:
    """TRIDENT's own CTransPath class on timm 0.5.4 at a smaller width, random weights (tests/fixtures/
    slide_encoders/make_ctranspath.py), saved as released: {"model": state} in the original Swin layout
    (downsampling at the end of a stage, the relative_position_index and attn_mask buffers), loaded strictly."""
    with safe_open(Path(__file__).parent / "fixtures" / "slide_encoders" / "ctranspath.safetensors", "pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    torch.save({"model": {k.removeprefix("state."): v for k, v in tensors.items() if k.startswith("state.")}},
               tmp_path / "ctranspath.pth")
    small = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4)}  # as make_ctranspath.py
    entry = dataclasses.replace(ENCODERS["ctranspath"], kwargs={**ENCODERS["ctranspath"].kwargs, **small}, width=128)
    encoder = PretrainedTileEncoder("ctranspath", entry).eval()
    encoder.load_pretrained(tmp_path / "ctranspath.pth")
    with torch.no_grad():
        ours = encoder(tensors["input"]).reshape(-1)
    # both sides run float32, possibly summing in another order (attention kernels, convolution algorithms):
    # 64 ulps of the output's scale bound that (measured: 0, the same order here); dropping the shifted
    # windows' masks moves the output by 0.5% of its scale, the other tile by 42%
    expected, scale = tensors["output"], tensors["output"].abs().max().item()
    assert ours.shape == expected.shape and scale > 0.1
    assert (ours - expected).abs().max().item() <= 64 * torch.finfo(torch.float32).eps * scale
    with pytest.raises(SettingError, match="tile_input=native: ctranspath is a Swin built for 224 px"):
        PretrainedTileEncoder("ctranspath", entry, tile_input="native")
    chief = SLIDE_ENCODERS["chief"]  # CHIEF reads token grids of this entry's features
    assert ENCODERS[chief.tile_encoder].width == chief.in_dim == 768


def test_refusals_name_the_file_and_the_entry(tmp_path: Path) -> None:
    model = TileModelWithWeights.from_mapping({"encoder": "kaiko-vits16", "preset": "hipt", "tile": {}, "weights": None,
                                               "trusted": False})
    with pytest.raises(ValueError, match="pretrained encoder: give its weights with model.weights"):
        load_encoder_weights(build_tile_encoder(model), model)
    other, _ = random_release("lunit-vits8", reduced("lunit-vits8", 1), tmp_path / "lunit")  # patch 8, not 16
    with pytest.raises(CheckpointError, match=rf"{other}.*kaiko-vits16.*shape mismatch.*patch_embed"):
        load_encoder_weights(build_tile_encoder(model), dataclasses.replace(model, weights=str(other)))
    path, reference = random_release("kaiko-vits16", ENCODERS["kaiko-vits16"], tmp_path / "kaiko")
    state = dict(reference.state_dict())
    state.pop("blocks.3.attn.qkv.weight")
    state["extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "partial.safetensors")
    with pytest.raises(CheckpointError, match=r"partial.safetensors.*kaiko-vits16.*blocks.3.attn.qkv.weight.*extra"):
        load_encoder_weights(build_tile_encoder(model), dataclasses.replace(model, weights=str(tmp_path / "partial.safetensors")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors or pytorch_model.bin"):
        load_encoder_weights(build_tile_encoder(model), dataclasses.replace(model, weights=str(tmp_path / "empty")))
    torch.save({"state": state, "args": argparse_like()}, tmp_path / "pickled.bin")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_encoder_weights(build_tile_encoder(model), dataclasses.replace(model, weights=str(tmp_path / "pickled.bin")))
    with pytest.raises(ValueError, match="timm:ARCH or a pretrained encoder .*uni_v1.*got 'uni'"):
        build_tile_encoder(dataclasses.replace(model, encoder="uni"))
    loaded = load_encoder_weights(build_tile_encoder(model), dataclasses.replace(model, weights=str(path)))
    assert loaded.weights["sha256"] == sha256(path)


def argparse_like():
    import argparse

    return argparse.Namespace(arch="vit_small")


def test_timm_arch_entry_and_native_input() -> None:
    model = TileModel.from_mapping({"encoder": "timm:vit_tiny_patch16_224", "preset": "hipt", "tile": {},
                                    "tile_input": "native", "timm_kwargs": {"dynamic_img_size": True, "depth": 2}})
    encoder = build_tile_encoder(model).eval()
    assert encoder.num_features == 192 and len(encoder.model.blocks) == 2
    with torch.no_grad():
        out = encoder(torch.randn(3, 3, 32, 32))  # at the tile's own size: 2 x 2 patches
    assert out.shape == (3, 192)
    assert encoder.prepare(torch.zeros(1, 3, 32, 32)).shape[-1] == 32


def test_lora_starts_as_its_base_and_trains_only_adapters() -> None:
    torch.manual_seed(0)
    entry = ENCODERS["kaiko-vits16"]
    base = PretrainedTileEncoder("kaiko-vits16", entry, tile_input="native").eval()
    adapted = PretrainedTileEncoder("kaiko-vits16", entry, tile_input="native", lora_rank=4)
    state = {k: v for k, v in adapted.state_dict().items()}
    for key, value in base.state_dict().items():  # the base weights under the wrapped names
        state[key.replace("qkv.", "qkv.base.")] = value
    adapted.load_state_dict(state)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(adapted.eval()(x), base(x), rtol=0, atol=0)  # B = 0: exactly the base
    adapted.requires_grad_(True).train()
    trained = [name for name, p in adapted.named_parameters() if p.requires_grad]
    assert len(trained) == 2 * 12 and all(name.endswith(("lora_a", "lora_b")) for name in trained)
    assert not adapted.model.training  # the frozen base stays in eval mode
    adapted(x).square().sum().backward()
    assert all((p.grad is None) != p.requires_grad for p in adapted.parameters())


def test_last_blocks_trainable() -> None:
    encoder = PretrainedTileEncoder("kaiko-vits16", ENCODERS["kaiko-vits16"], trainable=2)
    encoder.requires_grad_(True).train()
    trained = {name.split(".")[2] if ".blocks." in name else name for name, p in encoder.named_parameters()
               if p.requires_grad}
    assert trained == {"10", "11", "model.norm.weight", "model.norm.bias"}
    assert encoder.model.blocks[11].training and not encoder.model.blocks[9].training
    encoder.requires_grad_(False)
    assert not any(p.requires_grad for p in encoder.parameters())
    with pytest.raises(ValueError, match="has 12 blocks"):
        PretrainedTileEncoder("kaiko-vits16", ENCODERS["kaiko-vits16"], trainable=13).requires_grad_(True)


# ------------------------------------------------------------------------------------------ in the pipelines
def test_staged_path_with_a_pretrained_encoder(shards: Path, tmp_path: Path) -> None:
    """embed_tiles -> pretrain_vit4k -> embed_regions with kaiko-vits16 (its 32 px tiles native), and a slide
    model's bundle that finds the encoder's file through the configs and checks its sha256."""
    from hipt_e2e.data import RegionStream, SlideBagStream, load_manifest
    from hipt_e2e.data.embeddings import read_slide_bags
    from hipt_e2e.evaluation.splits import Fold
    from hipt_e2e.models.bundle import CARD, load_bundle, write_card
    from hipt_e2e.training.checkpointing import export_safetensors
    from hipt_e2e.training.slide_level import SlideSettings, build_slide_model, embedding_stages, slide_model_card
    from tests.test_dino_recipes import run_recipe

    path, _ = random_release("kaiko-vits16", ENCODERS["kaiko-vits16"], tmp_path / "kaiko")
    encoder = ["model.encoder=kaiko-vits16", "model.tile_input=native", f"model.weights={path.parent}"]
    run_recipe("embed_tiles", f"data.shards={shards}", *encoder, f"out={tmp_path / 'grids'}", "embed.dtype=float16")
    grids = load_manifest(tmp_path / "grids")
    assert grids["samples"] == load_manifest(shards)["samples"]
    run_recipe("pretrain_vit4k", f"data.shards={tmp_path / 'grids'}", f"out={tmp_path / 'vit4k'}", "train.epochs=1",
               "train.steps_per_epoch=1", "train.batch_size=4")
    assert json.loads((tmp_path / "vit4k" / CARD).read_text())["architecture"]["in_dim"] == 384  # the width
    run_recipe("embed_regions", f"data.shards={tmp_path / 'grids'}", f"model.weights={tmp_path / 'vit4k' / 'backbone.safetensors'}",
               f"out={tmp_path / 'slides'}")
    bags, classes = read_slide_bags(tmp_path / "slides")
    # attention-MIL's bags: every tile embedding of the slide with its level-0 corner, no region stage
    run_recipe("embed_regions", f"data.shards={tmp_path / 'grids'}", "embed.level=tile", f"out={tmp_path / 'tile_bags'}")
    tile_bags, _ = read_slide_bags(tmp_path / "tile_bags")
    grid_items = [i for i in RegionStream(tmp_path / "grids") if i["record"]["slide_id"] == tile_bags[0].slide_id]
    assert tile_bags[0].features.shape == (16 * len(grid_items), 384) and embedding_stages(tmp_path / "tile_bags") is None
    first = grid_items[0]
    torch.testing.assert_close(tile_bags[0].features[:16], first["pixels"].float().flatten(1).t())
    step = first["record"]["size"] // 4
    assert tile_bags[0].coords[6].tolist() == [first["record"]["x"] + 2 * step, first["record"]["y"] + step]  # row 1, col 2
    stages = embedding_stages(tmp_path / "slides")
    assert stages["tile"]["sha256"] == sha256(path) and stages["normalisation"] == "hipt"  # kaiko: 0.5 / 0.5
    cfg = SlideSettings.from_mapping({"model": {"name": "abmil", "dropout": 0.0, "hidden": None},
                                      "data": {"shards": str(tmp_path / "slides")}, "vote": "majority"})
    slide_model = build_slide_model(cfg.model, len(classes), bags[0].features.shape[1])
    export_safetensors(slide_model, tmp_path / "wsi" / "best_model.safetensors")
    write_card(tmp_path / "wsi" / "best_model.safetensors",
               slide_model_card(cfg, classes, bags[0].features.shape[1], Fold(0, (), (), ()), {}))
    bundle = load_bundle(tmp_path / "wsi")
    item = next(b for b in SlideBagStream(shards) if b["slide_id"] == bags[0].slide_id)
    with torch.no_grad():  # the grids were stored in float16: the bundle's fp32 grids round to them
        torch.testing.assert_close(bundle.model(item["pixels"]), slide_model.eval()(bags[0].features), rtol=0, atol=2e-3)
    changed = {key: value.clone() for key, value in load_file(path).items()} | {"cls_token": torch.zeros(1, 1, 384)}
    save_file(changed, tmp_path / "changed.safetensors")
    (tmp_path / "changed.safetensors").replace(path)  # the base file was replaced since training
    with pytest.raises(CheckpointError, match="not the file the model was trained on"):
        load_bundle(tmp_path / "wsi")


@pytest.mark.parametrize("mode", ["lora", "last_block", "frozen"])
def test_end_to_end_with_a_pretrained_encoder_saves_what_trained(shards: Path, tmp_path: Path, mode: str) -> None:
    from hipt_e2e.inference.predict import main as predict
    from tests.test_e2e import load_recipe, settings

    path, _ = random_release("kaiko-vits16", ENCODERS["kaiko-vits16"], tmp_path / "kaiko")
    extra = {"lora": ["model.lora.rank=2"], "last_block": ["model.tile_trainable=1"], "frozen": ["model.freeze_tile=true"]}
    run = tmp_path / "run"
    load_recipe().main(settings(shards, run, "model.encoder=kaiko-vits16", "model.tile_input=native",
                                f"model.weights.tile={path}", "train.epochs=1", *extra[mode]))
    card = json.loads((run / "fold_0" / "model_card.json").read_text())
    assert card["tile_base"] == {"path": str(path.resolve()), "sha256": sha256(path)}
    assert card["architecture"]["region"]["in_dim"] == 384
    saved = load_file(run / "fold_0" / "best_model.safetensors")
    tile_keys = sorted(key for key in saved if key.startswith("tile_encoder."))
    if mode == "lora":
        assert len(tile_keys) == 24 and all(key.endswith(("lora_a", "lora_b")) for key in tile_keys)
    elif mode == "last_block":
        assert tile_keys and all(".blocks.11." in key or ".norm." in key for key in tile_keys)
    else:
        assert tile_keys == []
    assert any(key.startswith("region_encoder.") for key in saved) and any(key.startswith("slide_model.") for key in saved)
    # hipt-predict rebuilds base + what trained: the run's own test predictions
    trained = {r["slide_id"]: r for r in csv.DictReader(open(run / "predictions.csv")) if r["fold"] == "0"}
    assert predict([str(shards), "input_kind=shards", "--model", str(run), "model.fold=0", f"out={tmp_path / 'p'}",
                    "top_regions=0"]) == 0
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "p" / "predictions.csv"))}
    for slide, row in trained.items():
        assert float(rows[slide]["prob_class_a"]) == pytest.approx(float(row["prob_class_a"]), abs=1e-5)


def test_lora_run_resumes_from_checkpoints_without_the_base(shards: Path, tmp_path: Path) -> None:
    from hipt_e2e.training.checkpointing import CHECKPOINT, load_checkpoint_state
    from tests.test_e2e import load_recipe, settings

    path, _ = random_release("kaiko-vits16", ENCODERS["kaiko-vits16"], tmp_path / "kaiko")
    common = settings(shards, tmp_path, "model.encoder=kaiko-vits16", "model.tile_input=native",
                      f"model.weights.tile={path}", "model.lora.rank=2", "train.checkpoint_every=3",
                      "train.epochs=1")  # 4 steps per fold: stopped after 6, in fold 1 between its checkpoints
    recipe = load_recipe()
    recipe.main([*common, f"out={tmp_path / 'whole'}"])
    assert recipe.main([*common, f"out={tmp_path / 'parts'}", "train.stop_after=6"]) is None
    recipe.main([*common, f"out={tmp_path / 'parts'}", "resume=true"])
    assert (tmp_path / "parts" / "predictions.csv").read_text() == (tmp_path / "whole" / "predictions.csv").read_text()
    state = load_checkpoint_state(tmp_path / "parts" / "fold_1" / CHECKPOINT)
    tile_keys = [key for key in state["model"] if key.startswith("tile_encoder.")]
    assert len(tile_keys) == 24 and all(key.endswith(("lora_a", "lora_b")) for key in tile_keys)


def test_kaiko_l14_loads_either_position_table_as_timm_does(tmp_path: Path) -> None:
    """kaiko's hubconf builds ViT-L/14 at timm's default 518 px (a 37 x 37 position table), as TRIDENT does; the
    timm copy `..._reg4_224` holds a 16 x 16 table. Both files load: the copy's table resampled exactly as timm's
    own loader resamples it, every other tensor as released."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    entry = reduced("kaiko-vitl14", 1)
    assert "img_size" not in ENCODERS["kaiko-vitl14"].kwargs
    own_file, own = random_release("kaiko-vitl14", entry, tmp_path / "kaiko")
    encoder = PretrainedTileEncoder("kaiko-vitl14", entry)
    encoder.load_pretrained(own_file)
    assert own.pos_embed.shape[1] == 37 * 37 and torch.equal(encoder.model.pos_embed, own.pos_embed)
    copy_file, copy = random_release("kaiko-vitl14", dataclasses.replace(entry, kwargs={**entry.kwargs, "img_size": 224}),
                                     tmp_path / "copy")
    encoder = PretrainedTileEncoder("kaiko-vitl14", entry)
    encoder.load_pretrained(copy_file)
    assert copy.pos_embed.shape[1] == 16 * 16
    timm_loaded = checkpoint_filter_fn(copy.state_dict(), encoder.model)
    assert all(torch.equal(value, timm_loaded[key]) for key, value in encoder.model.state_dict().items())
    assert all(torch.equal(value, copy.state_dict()[key]) for key, value in encoder.model.state_dict().items()
               if key != "pos_embed")


def test_an_unset_precision_runs_the_entry_precision_on_a_gpu_and_float32_on_the_cpu(monkeypatch) -> None:
    from hipt_e2e.models.foundation import run_precision

    uni = PretrainedTileEncoder("uni_v1", reduced("uni_v1", 1))  # TRIDENT's fp16
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    assert run_precision(uni, None) == ("fp16" if torch.cuda.is_available() else "no")
    assert run_precision(uni, "bf16") == "bf16" and run_precision(torch.nn.Linear(1, 1), None) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert run_precision(uni, None) == "fp16"
    assert run_precision(PretrainedTileEncoder("lunit-vits8", reduced("lunit-vits8", 1)), None) == "no"  # fp32
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision bf16
    assert run_precision(uni, None) is None
