"""Prov-GigaPath's slide encoder (Xu et al. 2024): LongNet over GigaPath tile features placed by their coordinates.

A slide's tiles form one sequence after a class token, each tile's projected feature plus the 2-D sin-cos embedding
of its cell on the slide's tile lattice. LongNet's dilated attention splits the sequence into segments and lets
head group r of a segment attend only to its tokens r, r + ratio, ...; five (segment, ratio) branches are merged
by their softmax normalisers. Parameter names are those of the authors' LongNetViT over torchscale's
LongNetEncoder, so their slide_encoder.pth loads as it is; tests/fixtures/slide_encoders/make_gigapath.py checks
the outputs against their code.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hipt_e2e.errors import InputError, SettingError

# gigapath_slide_enc12l768d: segment lengths log-spaced from 1,024 tokens to the tiles of a 262,144 px slide of
# 256 px tiles (1024²), as the authors compute them, each with its dilation ratio
SEGMENT_LENGTHS = (1024, 5792, 32768, 185363, 1048576)
DILATION_RATIOS = (1, 2, 4, 8, 16)
GRID = 1000  # the authors' position table: 1,000 x 1,000 tile cells
LSE_QUERIES = 4096  # queries per log-sum-exp matmul, which bounds its memory on slides of many tiles


def tile_position_embedding(coords: torch.Tensor, tile_size: float, dim: int) -> torch.Tensor:
    """Level-0 (x, y) px [N, 2] -> [N, dim]: the authors' 2-D sin-cos embedding of the tile's cell (half the
    channels for the row, half for the column). Their table is indexed by column * GRID + row, so a row past the
    grid wraps into the next column as it does there; cells past the table are refused."""
    cells = torch.div(coords, tile_size, rounding_mode="floor").long()
    index = cells[:, 0] * GRID + cells[:, 1]
    outside = (index < 0) | (index >= GRID * GRID)
    if outside.any():
        raise InputError("tile coordinates", f"tiles of {tile_size} px must lie within the first {GRID} x {GRID} "
                                             f"cells from the origin, as Prov-GigaPath's position table; got cell "
                                             f"(x, y) = {tuple(cells[outside][0].tolist())}")
    column, row = index.div(GRID, rounding_mode="floor"), index % GRID
    # float64 as their numpy table, then float32
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    angles = [axis[:, None].double() * omega for axis in (row, column)]
    return torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], dim=1).float()


def _sparse(x: torch.Tensor, segment: int, ratio: int) -> torch.Tensor:
    """[B, L, H, D] -> [B * segments, H, segment / ratio, D]: zero-padded to whole segments and ratios, head group r
    (of H / ratio heads) keeps tokens r, r + ratio, ... of each segment."""
    B, L, H, D = x.shape
    n, m = -(-L // segment), -(-segment // ratio)
    x = F.pad(x, (0, 0, 0, 0, 0, n * segment - L)).reshape(B * n, segment, H, D)
    x = F.pad(x, (0, 0, 0, 0, 0, m * ratio - segment)).reshape(B * n, m, ratio, ratio, H // ratio, D)
    return x.diagonal(dim1=2, dim2=3).movedim(-1, 1).transpose(2, 3).reshape(B * n, H, m, D)


def _dense(x: torch.Tensor, ratio: int, batch: int, length: int, fill: float) -> torch.Tensor:
    """_sparse's inverse for outputs [B * segments, H, m, *E] -> [B, L, H, *E], `fill` where a head group skips a
    token. As in the authors' code each segment keeps its ratio padding when the segments are joined, which shifts
    later segments when a segment length is not a multiple of its ratio (released: 185,363 tokens, ratio 8)."""
    bn, H, m, *E = x.shape
    dense = x.new_full((bn, m, ratio, ratio, H // ratio, *E), fill)
    dense.diagonal(dim1=2, dim2=3).copy_(x.unflatten(1, (ratio, H // ratio)).movedim(1, -1).movedim(2, 1))
    return dense.reshape(batch, -1, H, *E)[:, :length]


class DilatedAttention(nn.Module):
    """LongNet's dilated self-attention with torchscale's sub-LayerNorm before the output projection. Padded keys
    are zeros that stay in the softmax, as with the authors' unmasked flash-attention call."""

    def __init__(self, dim: int, heads: int, segment_lengths: tuple[int, ...], ratios: tuple[int, ...]) -> None:
        super().__init__()
        if any(heads % ratio for ratio in ratios):
            raise SettingError(f"LongNet: {heads} heads do not split into groups for dilation ratios {ratios}")
        self.heads, self.branches = heads, tuple(zip(segment_lengths, ratios))
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(dim, dim) for _ in range(4))
        self.inner_attn_ln = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, dim = x.shape
        q, k, v = (proj(x).view(B, L, self.heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        outs, lses = [], []
        for segment, ratio in self.branches:
            qs, ks, vs = (_sparse(t, min(segment, L), ratio) for t in (q, k, v))
            with torch.no_grad():  # SDPA does not return the normaliser; the authors' branch weights are constants
                lse = torch.cat([torch.logsumexp(chunk @ ks.transpose(-2, -1) * qs.shape[-1] ** -0.5, dim=-1)
                                 for chunk in qs.split(LSE_QUERIES, dim=2)], dim=2)
                # the authors' scattering reads a normaliser of exactly 0 as a skipped token: a branch drops out
                # where a zero padding key (score 0) outweighs the real ones
                lse = lse.masked_fill(lse == 0, float("-inf"))
            outs.append(_dense(F.scaled_dot_product_attention(qs, ks, vs), ratio, B, L, 0.0))
            lses.append(_dense(lse, ratio, B, L, float("-inf")))
        # one softmax over the union of the branches' keys
        weights = torch.softmax(torch.stack(lses), dim=0).unsqueeze(-1)
        out = (torch.stack(outs) * weights).sum(0).reshape(B, L, dim)
        return self.out_proj(self.inner_attn_ln(out))


class FeedForward(nn.Module):
    """torchscale's FFN with its sub-LayerNorm between the two layers."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.ffn_layernorm, self.fc2 = nn.Linear(dim, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ffn_layernorm(F.gelu(self.fc1(x))))


class LongNetLayer(nn.Module):
    """A pre-LayerNorm encoder layer (torchscale's EncoderLayer with subln)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, segment_lengths: tuple[int, ...],
                 ratios: tuple[int, ...]) -> None:
        super().__init__()
        self.self_attn_layer_norm, self.final_layer_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.self_attn = DilatedAttention(dim, heads, segment_lengths, ratios)
        self.ffn = FeedForward(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.ffn(self.final_layer_norm(x))


class GigaPathSlideEncoder(nn.Module):
    """Tile features [N, in_dim] at level-0 coords [N, 2] -> the slide embedding [dim] as TRIDENT takes it: the
    mean over the tiles of the hidden state after `layers` LongNet layers (TRIDENT reads the 11th of the release's
    12, before the encoder's final LayerNorm), LayerNorm'ed. The layers after it are not built."""

    def __init__(self, in_dim: int = 1536, dim: int = 768, layers: int = 11, heads: int = 16, mlp_dim: int = 3072,
                 segment_lengths: tuple[int, ...] = SEGMENT_LENGTHS,
                 ratios: tuple[int, ...] = DILATION_RATIOS) -> None:
        super().__init__()
        self.patch_embed = nn.ModuleDict({"proj": nn.Linear(in_dim, dim)})
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(
            LongNetLayer(dim, heads, mlp_dim, segment_lengths, ratios) for _ in range(layers))})
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, features: torch.Tensor, coords: torch.Tensor, tile_size_level0: float) -> torch.Tensor:
        tiles = self.patch_embed["proj"](features) + tile_position_embedding(coords, tile_size_level0,
                                                                              self.cls_token.shape[-1]).to(features)
        x = torch.cat([self.cls_token[0], tiles])[None]  # the class token's position embedding is zeros
        for layer in self.encoder["layers"]:
            x = layer(x)
        return self.norm(x[0, 1:].mean(0))
