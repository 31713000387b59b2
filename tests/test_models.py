"""hipt_e2e.models against the facts: key names, parameter counts, exactness against the naive
reference in naive_hipt.py (float32, 1e-5), freezing, gradient checkpointing and checkpoint files."""
from __future__ import annotations

import argparse
import logging

import pytest
import torch
import torch.nn.functional as F
from naive_hipt import naive_hipt, naive_slide, naive_vit4k, naive_vit256, random_weights

from hipt_e2e.models import (
    HIPT,
    CheckpointError,
    cnn256,
    load_checkpoint,
    model_preset,
    resize_pos_table,
    select_attention,
    tokens_to_grid,
    vit4k,
    vit256,
    vit_wsi,
)
from hipt_e2e.models.convert import main as convert_main
from hipt_e2e.normalise import normalise

TOL = 1e-5


# ---- the released layout, written out from HIPT_FACTS.md (not from the production modules) ----

def _vit_block_shapes(depth: int, dim: int) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i in range(depth):
        p = f"blocks.{i}"
        shapes |= {f"{p}.norm1.weight": (dim,), f"{p}.norm1.bias": (dim,),
                   f"{p}.attn.qkv.weight": (3 * dim, dim), f"{p}.attn.qkv.bias": (3 * dim,),
                   f"{p}.attn.proj.weight": (dim, dim), f"{p}.attn.proj.bias": (dim,),
                   f"{p}.norm2.weight": (dim,), f"{p}.norm2.bias": (dim,),
                   f"{p}.mlp.fc1.weight": (4 * dim, dim), f"{p}.mlp.fc1.bias": (4 * dim,),
                   f"{p}.mlp.fc2.weight": (dim, 4 * dim), f"{p}.mlp.fc2.bias": (dim,)}
    return shapes


VIT256_LAYOUT = {"cls_token": (1, 1, 384), "pos_embed": (1, 197, 384), "patch_embed.proj.weight": (384, 3, 16, 16),
                 "patch_embed.proj.bias": (384,), **_vit_block_shapes(12, 384),
                 "norm.weight": (384,), "norm.bias": (384,)}
VIT4K_LAYOUT = {"cls_token": (1, 1, 192), "pos_embed": (1, 197, 192), "phi.0.weight": (192, 384), "phi.0.bias": (192,),
                **_vit_block_shapes(6, 192), "norm.weight": (192,), "norm.bias": (192,)}


def _slide_layout(n_classes: int) -> dict[str, tuple[int, ...]]:
    linear = lambda name, out=192: {f"{name}.weight": (out, 192), f"{name}.bias": (out,)}  # noqa: E731
    shapes = {**linear("global_phi.0"), **linear("global_attn_pool.attention_a.0"),
              **linear("global_attn_pool.attention_b.0"), **linear("global_attn_pool.attention_c", 1),
              **linear("global_rho.0"), **linear("classifier", n_classes)}
    for i in range(2):
        p = f"global_transformer.layers.{i}"
        shapes |= {f"{p}.self_attn.in_proj_weight": (576, 192), f"{p}.self_attn.in_proj_bias": (576,),
                   **linear(f"{p}.self_attn.out_proj"), **linear(f"{p}.linear1"), **linear(f"{p}.linear2"),
                   f"{p}.norm1.weight": (192,), f"{p}.norm1.bias": (192,),
                   f"{p}.norm2.weight": (192,), f"{p}.norm2.bias": (192,)}
    return shapes


def _count(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def released_vit256() -> dict[str, torch.Tensor]:
    return random_weights(VIT256_LAYOUT)


# ---- layout and sizes ----

def test_state_dicts_match_released_layout() -> None:
    assert _shapes(vit256()) == VIT256_LAYOUT and len(VIT256_LAYOUT) == 150
    assert _shapes(vit4k()) == VIT4K_LAYOUT and len(VIT4K_LAYOUT) == 78
    assert _shapes(vit_wsi(2)) == _slide_layout(2)


def test_parameter_counts() -> None:
    assert _count(vit256()) == 21_665_664
    assert _count(vit4k()) == 2_781_504
    model = HIPT.from_preset("hipt", n_classes=2, freeze_region=True)
    assert _count(model.region_encoder) + _count(model.slide_model) == 3_376_515
    model.set_frozen(tile=True)
    assert _count(model, trainable_only=True) == 595_011


def test_presets() -> None:
    tiny = model_preset("tiny")
    tiny["tile"]["depth"] = 99
    assert model_preset("tiny")["tile"]["depth"] == 2  # a fresh copy each time
    with pytest.raises(ValueError, match="unknown model preset"):
        model_preset("huge")


# ---- exactness against the naive reference ----

def test_pos_table_rule_is_scale_factor_not_size() -> None:
    table = torch.randn(1, 197, 8)
    resized = resize_pos_table(table, 16, 16, 14)
    by_size = F.interpolate(table[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
    assert (resized[:, 1:] - by_size.permute(0, 2, 3, 1).reshape(1, 256, 8)).abs().max() > 1e-3
    assert resize_pos_table(table, 14, 14, 14) is table  # the pretraining grid uses the table unchanged


@pytest.mark.parametrize("px", [256, 224])
def test_vit256_matches_naive(released_vit256: dict[str, torch.Tensor], px: int) -> None:
    model = vit256().eval()
    model.load_state_dict(released_vit256)
    x = torch.randn(2, 3, px, px, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(x) - naive_vit256(released_vit256, x)).abs().max() <= TOL
        assert (model(x) - model.forward_head(model.forward_features(x))).abs().max() <= TOL


@pytest.mark.parametrize("grid", [(16, 16), (14, 14), (6, 6), (3, 5)])
def test_vit4k_matches_naive(grid: tuple[int, int]) -> None:
    weights = random_weights(VIT4K_LAYOUT)
    model = vit4k().eval()
    model.load_state_dict(weights)
    x = torch.randn(3, 384, *grid, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        embedding, attention = model.forward_with_attention(x)
        expected, expected_attention = naive_vit4k(weights, x)
    assert (embedding - expected).abs().max() <= TOL
    assert (attention - expected_attention).abs().max() <= TOL
    assert attention.shape == (3, 6, *grid)


def test_vit_wsi_matches_naive() -> None:
    weights = random_weights(_slide_layout(3))
    model = vit_wsi(3).eval()
    model.load_state_dict(weights)
    regions = torch.randn(11, 192, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, attention = model(regions, return_attention=True)
        expected, expected_attention = naive_slide(weights, regions)
    assert logits.shape == (1, 3) and attention.shape == (11,)
    assert (logits - expected).abs().max() <= TOL
    assert (attention - expected_attention).abs().max() <= TOL


def _regions(m: int, rows: int, cols: int, tile_px: int = 32, seed: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (m, 3, rows * tile_px, cols * tile_px), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("rows, cols", [(4, 4), (2, 3)])
def test_hipt_matches_naive_composition(rows: int, cols: int) -> None:
    torch.manual_seed(0)
    model = HIPT.from_preset("tiny", n_classes=3, chunk_size=5).eval()  # chunks straddle regions
    regions = _regions(3, rows, cols)
    with torch.no_grad():
        logits = model(regions)
        expected = naive_hipt(model.tile_encoder.state_dict(), model.region_encoder.state_dict(),
                              model.slide_model.state_dict(), regions, tile_px=32,
                              tile_heads=3, region_heads=3, slide_heads=3)
    assert logits.shape == (1, 3)
    assert (logits - expected).abs().max() <= TOL


def test_token_grid_raster_order() -> None:
    torch.manual_seed(0)
    model = HIPT.from_preset("tiny").eval()
    regions = _regions(2, 2, 3)
    with torch.no_grad():
        grids = model.token_grids(regions)
        for r in range(2):
            for c in range(3):
                tile = regions[:, :, r * 32:(r + 1) * 32, c * 32:(c + 1) * 32]
                assert (grids[:, :, r, c] - model.tile_encoder(normalise(tile, "hipt"))).abs().max() <= TOL


def test_tokens_to_grid_matches_released_unfold() -> None:
    tokens = torch.randn(2, 16, 5)  # HIPT_LGP_FC turned [M, 256, 384] into grids with unfold + transpose
    assert torch.equal(tokens_to_grid(tokens, 4, 4), tokens.unfold(1, 4, 4).transpose(1, 2))
    assert torch.equal(tokens_to_grid(tokens[:, :6], 2, 3)[1, :, 1, 2], tokens[1, 5])


def test_hipt_attention_outputs() -> None:
    torch.manual_seed(0)
    model = HIPT.from_preset("tiny").eval()
    regions = _regions(3, 4, 4)
    with torch.no_grad():
        logits, attention = model(regions, return_attention=True)
        expected_tile = naive_vit4k(model.region_encoder.state_dict(), model.token_grids(regions), heads=3)[1]
        assert torch.equal(logits, model(regions))
    assert (attention.tile - expected_tile).abs().max() <= TOL
    assert attention.region.shape == (3,) and abs(attention.region.sum().item() - 1) < 1e-6


def test_tile_mask_gives_zero_embeddings() -> None:
    torch.manual_seed(0)
    model = HIPT.from_preset("tiny", chunk_size=3).eval()
    regions = _regions(2, 4, 4)
    mask = torch.zeros(2, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = mask[1, 3, :] = True
    with torch.no_grad():
        full, masked = model.token_grids(regions), model.token_grids(regions, mask)
    assert masked.permute(0, 2, 3, 1)[mask].abs().max() == 0
    assert (masked.permute(0, 2, 3, 1)[~mask] - full.permute(0, 2, 3, 1)[~mask]).abs().max() <= TOL
    with pytest.raises(ValueError, match="tile_mask"):
        model.token_grids(regions, mask[:, :2])


# ---- training: freezing, checkpointing, the CNN variant ----

@pytest.mark.parametrize("stage", ["tile", "region", "slide"])
def test_freeze_flags_stop_gradients(stage: str) -> None:
    torch.manual_seed(0)
    model = HIPT.from_preset("tiny", **{f"freeze_{stage}": True}).train()
    model(_regions(2, 4, 4)).sum().backward()
    for name in ("tile", "region", "slide"):
        grads = [p.grad for p in model.stage(name).parameters()]
        if name == stage:
            assert all(g is None for g in grads)
            assert not model.stage(name).training  # frozen stages stay in eval mode
        else:
            assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_frozen_lower_stages_build_no_graph() -> None:
    model = HIPT.from_preset("tiny", freeze_tile=True, freeze_region=True)
    assert not model.region_embeddings(_regions(1, 4, 4)).requires_grad
    model.set_frozen(region=False)
    assert model.region_embeddings(_regions(1, 4, 4)).requires_grad


def _gradients(model: HIPT, regions: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(1)  # the same dropout masks in both runs
    model(regions).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointed_and_plain_gradients_match() -> None:
    torch.manual_seed(0)
    model = HIPT.from_preset("tiny", chunk_size=5).train()
    regions = _regions(2, 4, 4)
    plain = _gradients(model, regions)
    model.set_grad_checkpointing(chunks=True, blocks=True)
    checkpointed = _gradients(model, regions)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert (grad - checkpointed[name]).abs().max() <= 1e-6, name


def attention_paths(model: torch.nn.Module) -> set[bool]:
    """Whether each timm attention block of `model` uses torch's fused kernel (True) or the explicit path."""
    return {module.fused_attn for module in model.modules() if hasattr(module, "fused_attn")}


@pytest.mark.parametrize("device, precision, fused", [("cpu", "bf16", False), ("cpu", "fp16", False),
                                                      ("cpu", "no", True), ("cuda", "bf16", True)])
def test_select_attention_per_device_and_precision(device: str, precision: str, fused: bool) -> None:
    model = HIPT.from_preset("tiny")
    select_attention(model, torch.device("cpu"), "bf16")  # a previous choice is undone where it does not apply
    assert select_attention(model, torch.device(device), precision) is model
    assert attention_paths(model.tile_encoder) == attention_paths(model.region_encoder) == {fused}


def test_explicit_attention_matches_fused_outputs_and_gradients() -> None:
    torch.manual_seed(0)
    model = HIPT.from_preset("tiny").train()
    regions = _regions(2, 4, 4)
    fused = _gradients(model, regions)
    select_attention(model, torch.device("cpu"), "bf16")
    assert attention_paths(model) == {False}
    explicit = _gradients(model, regions)  # in fp32: only the kernel differs
    for name, grad in fused.items():
        assert (grad - explicit[name]).abs().max() <= 1e-5 * max(grad.abs().max().item(), 1.0), name


def test_chunk_checkpointing_bounds_saved_activations() -> None:
    torch.manual_seed(0)
    model = HIPT.from_preset("tiny", chunk_size=16, freeze_region=True, freeze_slide=True).train()

    def saved_bytes(n_regions: int) -> int:
        total = 0

        def pack(t: torch.Tensor) -> torch.Tensor:
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(_regions(n_regions, 4, 4)).sum()
        return total

    plain = saved_bytes(4) - saved_bytes(2)
    model.set_grad_checkpointing(chunks=True)
    checkpointed = saved_bytes(4) - saved_bytes(2)
    assert checkpointed * 10 < plain


def test_cnn256_loads_local_weights() -> None:
    source = cnn256("resnet18", embed_dim=16)
    model = cnn256("resnet18", embed_dim=16, weights=source.cnn.state_dict())  # a path works the same way
    assert all(torch.equal(v, model.cnn.state_dict()[k]) for k, v in source.cnn.state_dict().items())
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 16)


def test_cnn_tile_encoder_runs_through_hipt() -> None:
    torch.manual_seed(0)
    model = HIPT.from_preset("tiny", n_classes=3, cnn="resnet18", chunk_size=7, checkpoint_chunks=True).train()
    logits = model(_regions(2, 4, 4))
    assert logits.shape == (1, 3)
    logits.sum().backward()
    assert model.tile_encoder.cnn.conv1.weight.grad is not None
    assert model.token_grids(_regions(1, 2, 2)).shape == (1, 48, 2, 2)


# ---- checkpoint files ----

def _dino_checkpoint(backbone: dict[str, torch.Tensor]) -> dict:
    """A released-style DINO training state: wrapper prefixes, a DINO head, non-tensor entries."""
    head = {"head.mlp.0.weight": torch.zeros(2048, 192), "head.mlp.4.bias": torch.zeros(256),
            "head.last_layer.weight_g": torch.ones(65536, 1), "head.last_layer.weight_v": torch.zeros(65536, 256)}
    teacher = {f"backbone.{k}": v for k, v in backbone.items()} | head
    student = {f"module.{k}": torch.zeros_like(v) for k, v in teacher.items()}
    return {"student": student, "teacher": teacher, "epoch": 3, "args": argparse.Namespace(arch="vit4k_xs")}


def test_released_dino_checkpoint_needs_trust_and_loads(tmp_path) -> None:
    weights = random_weights(VIT4K_LAYOUT)
    path = tmp_path / "vit4k_xs_dino.pth"
    torch.save(_dino_checkpoint(weights), path)
    with pytest.raises(CheckpointError, match=r"trusted=True.*hipt-convert"):
        load_checkpoint(vit4k(), path)
    model = vit4k().eval()
    assert load_checkpoint(model, path, trusted=True) == ([], [])
    grid = torch.randn(2, 384, 16, 16)
    with torch.no_grad():
        assert (model(grid) - naive_vit4k(weights, grid)[0]).abs().max() <= TOL  # the teacher's weights


def test_hipt_convert_writes_safetensors(tmp_path) -> None:
    weights = random_weights(VIT4K_LAYOUT)
    source, target = tmp_path / "dino.pth", tmp_path / "vit4k.safetensors"
    torch.save(_dino_checkpoint(weights), source)
    with pytest.raises(CheckpointError, match="trusted"):
        convert_main([str(source), str(target)])
    assert not target.exists()
    assert convert_main([str(source), str(target), "--trusted"]) == 0
    model = vit4k()
    assert load_checkpoint(model, target) == ([], [])  # no unpickling needed any more
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


def test_released_vit256_state_dict_loads(released_vit256: dict[str, torch.Tensor], tmp_path) -> None:
    path = tmp_path / "plain.pth"
    torch.save({f"module.{k}": v for k, v in released_vit256.items()}, path)
    model = vit256()
    assert load_checkpoint(model, path, strict=True) == ([], [])
    assert all(torch.equal(model.state_dict()[k], v) for k, v in released_vit256.items())


def test_wrong_checkpoint_fails_clearly(tmp_path) -> None:
    path = tmp_path / "vit4k.pth"
    torch.save(random_weights(VIT4K_LAYOUT), path)
    expected = r"does not fit TileViT.*cls_token: file \(1, 1, 192\) vs model \(1, 1, 384\)"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(vit256(), path)
    with pytest.raises(CheckpointError, match="no tensor of .* belongs to SlideTransformer"):
        load_checkpoint(vit_wsi(2), path)


def test_fold_checkpoint_loads_into_region_and_slide_models(tmp_path, caplog) -> None:
    region, slide = random_weights(VIT4K_LAYOUT), random_weights(_slide_layout(2))
    path = tmp_path / "s_0_checkpoint.pt"  # HIPT_LGP_FC fold checkpoint: local_vit.* + global part
    torch.save({f"local_vit.{k}": v for k, v in region.items()} | slide, path)
    assert load_checkpoint(vit4k(), path, prefix="local_vit.") == ([], [])
    with caplog.at_level(logging.WARNING):
        missing, unexpected = load_checkpoint(vit_wsi(2), path)
    assert missing == [] and len(unexpected) == 78 and all(k.startswith("local_vit.") for k in unexpected)
    assert "unexpected 78 [local_vit.* (78)]" in caplog.text


def test_missing_keys_are_reported() -> None:
    partial = {k: v for k, v in random_weights(VIT4K_LAYOUT).items() if not k.startswith("blocks.5.")}
    missing, unexpected = load_checkpoint(vit4k(), partial)
    assert len(missing) == 12 and all(k.startswith("blocks.5.") for k in missing) and unexpected == []
    with pytest.raises(CheckpointError, match="missing 12"):
        load_checkpoint(vit4k(), partial, strict=True)
