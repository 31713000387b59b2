"""A deliberately plain reference of HIPT, written from ../shared/reference/HIPT_FACTS.md.

Functional code over a state dict with the released key names: explicit softmax attention, the
position table interpolated at every forward, tiles cut with explicit loops in raster order. It
shares no code with `hipt_e2e.models`, so the exactness tests and the tile-encoder benchmark
compare the production modules against an independent reading of the facts.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

State = dict[str, torch.Tensor]


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> State:
    """Weights for the given key -> shape layout with O(1) activations and far-from-uniform attention,
    so that a wrong scale, order or interpolation shows in the outputs (unlike a near-zero init)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for key, shape in shapes.items():
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight")):  # LayerNorm gains
            weights[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2 and key not in ("cls_token", "pos_embed"):
            weights[key] = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        else:
            weights[key] = 0.5 * torch.randn(shape, generator=g)
    return weights


def _linear(sd: State, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _layer_norm(sd: State, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _self_attention(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """qkv [B, N, 3C] -> (output [B, N, C], weights [B, heads, N, N]) with an explicit softmax."""
    b, n, three_c = qkv.shape
    c = three_c // 3
    q, k, v = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(b, n, c), attn


def _interpolate_table(pos: torch.Tensor, g_rows: int, g_cols: int) -> torch.Tensor:
    n = pos.shape[1] - 1
    side = int(math.sqrt(n))
    if g_rows == side and g_cols == side:
        return pos
    grid = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, scale_factor=((g_rows + 0.1) / side, (g_cols + 0.1) / side), mode="bicubic")
    assert grid.shape[-2:] == (g_rows, g_cols)
    return torch.cat((pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, g_rows * g_cols, -1)), dim=1)


def _vit_trunk(sd: State, tokens: torch.Tensor, g_rows: int, g_cols: int,
               heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLS + table + pre-norm blocks + final norm -> (CLS embedding, last block's attention)."""
    x = torch.cat((sd["cls_token"].expand(tokens.shape[0], -1, -1), tokens), dim=1)
    x = x + _interpolate_table(sd["pos_embed"], g_rows, g_cols)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        p = f"blocks.{i}"
        h, attn = _self_attention(_linear(sd, f"{p}.attn.qkv", _layer_norm(sd, f"{p}.norm1", x, 1e-6)), heads)
        x = x + _linear(sd, f"{p}.attn.proj", h)
        h = F.gelu(_linear(sd, f"{p}.mlp.fc1", _layer_norm(sd, f"{p}.norm2", x, 1e-6)))
        x = x + _linear(sd, f"{p}.mlp.fc2", h)
    return _layer_norm(sd, "norm", x, 1e-6)[:, 0], attn


def naive_vit256(sd: State, pixels: torch.Tensor, heads: int = 6) -> torch.Tensor:
    """Normalised tiles [B, 3, H, W] -> [B, C]."""
    weight = sd["patch_embed.proj.weight"]
    patch = weight.shape[-1]
    tokens = F.conv2d(pixels, weight, sd["patch_embed.proj.bias"], stride=patch)
    rows, cols = pixels.shape[-2] // patch, pixels.shape[-1] // patch
    return _vit_trunk(sd, tokens.flatten(2).transpose(1, 2), rows, cols, heads)[0]


def naive_vit4k(sd: State, grid: torch.Tensor, heads: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-embedding grids [B, C_in, rows, cols] -> ([B, C], CLS attention over the grid [B, heads, rows, cols])."""
    b, c_in, rows, cols = grid.shape
    tokens = torch.stack([grid[:, :, r, col] for r in range(rows) for col in range(cols)], dim=1)
    embedding, attn = _vit_trunk(sd, F.gelu(_linear(sd, "phi.0", tokens)), rows, cols, heads)
    return embedding, attn[:, :, 0, 1:].reshape(b, heads, rows, cols)


def naive_slide(sd: State, regions: torch.Tensor, heads: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """HIPT_LGP_FC global part on region embeddings [M, C] -> (logits [1, K], attention [M])."""
    h = F.relu(_linear(sd, "global_phi.0", regions))
    for i in range(2):  # post-norm encoder layers; the M regions are one sequence
        p = f"global_transformer.layers.{i}"
        qkv = F.linear(h, sd[f"{p}.self_attn.in_proj_weight"], sd[f"{p}.self_attn.in_proj_bias"])
        attn_out = _linear(sd, f"{p}.self_attn.out_proj", _self_attention(qkv[None], heads)[0][0])
        h = _layer_norm(sd, f"{p}.norm1", h + attn_out, 1e-5)
        ff = _linear(sd, f"{p}.linear2", F.relu(_linear(sd, f"{p}.linear1", h)))
        h = _layer_norm(sd, f"{p}.norm2", h + ff, 1e-5)
    a = torch.tanh(_linear(sd, "global_attn_pool.attention_a.0", h))
    gate = torch.sigmoid(_linear(sd, "global_attn_pool.attention_b.0", h))
    scores = _linear(sd, "global_attn_pool.attention_c", a * gate)[:, 0]
    weights = scores.softmax(dim=0)
    slide = F.relu(_linear(sd, "global_rho.0", weights @ h))
    return _linear(sd, "classifier", slide)[None], weights


def naive_hipt(tile_sd: State, region_sd: State, slide_sd: State, regions_uint8: torch.Tensor, tile_px: int,
               tile_heads: int = 6, region_heads: int = 6, slide_heads: int = 3) -> torch.Tensor:
    """uint8 regions [M, 3, H, W] -> logits, with 0.5/0.5 normalisation and raster tile order."""
    x = regions_uint8.float() / 255.0
    x = (x - 0.5) / 0.5
    m, _, height, width = x.shape
    rows, cols = height // tile_px, width // tile_px
    grids = []
    for i in range(m):
        tiles = [x[i, :, r * tile_px:(r + 1) * tile_px, c * tile_px:(c + 1) * tile_px]
                 for r in range(rows) for c in range(cols)]
        emb = naive_vit256(tile_sd, torch.stack(tiles), tile_heads)  # [rows*cols, C], index r*cols + c
        grids.append(emb.T.reshape(-1, rows, cols))
    region_emb = naive_vit4k(region_sd, torch.stack(grids), region_heads)[0]
    return naive_slide(slide_sd, region_emb, slide_heads)[0]
