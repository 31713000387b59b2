"""The two ViT levels of HIPT: the tile encoder (ViT256) and the region encoder (ViT4K).

Both are a CLS token, a square position table, pre-norm timm `Block`s and a final LayerNorm; they differ
only in how the input becomes tokens (patches of pixels vs. a projection `phi` of a grid of tile
embeddings). State-dict names follow the released checkpoints.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed, trunc_normal_, use_fused_attn
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

# The released tables cover a 14 x 14 grid (224 px tiles / 14 x 14 token crops during DINO).
HIPT_POS_GRID = 14


def select_attention(model: nn.Module, device: torch.device, mixed_precision: str | None) -> nn.Module:
    """How `model`'s timm attention blocks compute attention where it runs: on CPUs under bf16/fp16 autocast
    timm's explicit path (1.3-1.65x faster training steps than torch's kernels there, docs/benchmarks.md),
    elsewhere torch's fused kernels, as timm's global setting allows."""
    explicit = device.type == "cpu" and mixed_precision in ("bf16", "fp16")
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = not explicit and use_fused_attn()
    return model


def resize_pos_table(pos_embed: torch.Tensor, rows: int, cols: int, pos_grid: int) -> torch.Tensor:
    """Position table [1, 1 + pos_grid**2, C] -> [1, 1 + rows*cols, C] by HIPT's rule: bicubic with a *scale
    factor* (g + 0.1) / pos_grid, not a target size (they differ by up to ~1e-2, and the released weights
    reproduce their outputs only with this call)."""
    if (rows, cols) == (pos_grid, pos_grid):
        return pos_embed
    cls_pos, grid_pos = pos_embed[:, :1], pos_embed[:, 1:]
    dim = grid_pos.shape[-1]
    grid_pos = grid_pos.reshape(1, pos_grid, pos_grid, dim).permute(0, 3, 1, 2)
    grid_pos = F.interpolate(grid_pos, scale_factor=((rows + 0.1) / pos_grid, (cols + 0.1) / pos_grid), mode="bicubic",
                             align_corners=False)
    grid_pos = grid_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((cls_pos, grid_pos), dim=1)


class GridViT(nn.Module):
    """ViT trunk over a token grid; subclasses define `tokenize(x) -> (tokens [B,N,C], rows, cols)`."""

    def __init__(self, embed_dim: int, depth: int, num_heads: int, mlp_ratio: float = 4.0,
                 pos_grid: int = HIPT_POS_GRID, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.embed_dim = self.num_features = embed_dim
        self.pos_grid = pos_grid
        self.grad_checkpointing = False
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pos_grid * pos_grid, embed_dim))
        drop_rates = torch.linspace(0, drop_path_rate, depth).tolist()  # stochastic depth rises linearly
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=rate,
                                          norm_layer=partial(nn.LayerNorm, eps=1e-6)) for rate in drop_rates)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)

    def init_weights(self) -> None:
        """DINO's initialisation: truncated normal (std .02) tables and linears (LayerNorms start at 1 and 0)."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def tokenize(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        raise NotImplementedError

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _embed(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        tokens, rows, cols = self.tokenize(x)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat((cls, tokens), dim=1)
        return tokens + resize_pos_table(self.pos_embed, rows, cols, self.pos_grid), rows, cols

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args), checkpointed when block checkpointing is on and a graph is being built."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> all normalised tokens [B, 1 + rows*cols, C] (CLS first)."""
        tokens, _, _ = self._embed(x)
        for block in self.blocks:
            tokens = self._run(block, tokens)
        return self.norm(tokens)

    def forward_head(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised tokens -> the CLS embedding [B, C] (HIPT has no classifier at this level)."""
        return tokens[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS embedding [B, C]; equals forward_head(forward_features(x)) at less cost."""
        return self.forward_with_attention(x)[0]

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CLS embedding [B, C] and the last block's CLS attention over the grid [B, heads, rows, cols]."""
        tokens, rows, cols = self._embed(x)
        for block in self.blocks[:-1]:
            tokens = self._run(block, tokens)
        cls, attention = self._run(cls_block, self.blocks[-1], tokens)
        embedding = self.norm(cls)[:, 0]
        return embedding, attention[..., 1:].reshape(attention.shape[0], -1, rows, cols)


def cls_block(block: Block, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a pre-norm timm `Block` for the CLS query only: (CLS token [B, 1, C], attention [B, heads, N]).

    The pooled output depends on no other query of the last block, so the other rows are skipped (~7 % of
    ViT256's work); the softmax is explicit because the fused kernel does not expose the weights.
    """
    attn = block.attn
    batch, n_tokens, dim = tokens.shape
    h = block.norm1(tokens)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = F.linear(h[:, :1], weight[:dim], bias[:dim]).reshape(batch, attn.num_heads, 1, attn.head_dim)
    kv = F.linear(h, weight[dim:], bias[dim:]).reshape(batch, n_tokens, 2, attn.num_heads, attn.head_dim)
    k, v = kv.permute(2, 0, 3, 1, 4)  # [B, heads, N, head_dim] each
    weights = ((q @ k.transpose(-2, -1)) * attn.scale).softmax(dim=-1)  # [B, heads, 1, N]
    out = (attn.attn_drop(weights) @ v).transpose(1, 2).reshape(batch, 1, dim)
    cls = tokens[:, :1] + block.drop_path1(block.ls1(attn.proj_drop(attn.proj(out))))
    cls = cls + block.drop_path2(block.ls2(block.mlp(block.norm2(cls))))
    return cls, weights.squeeze(2)


class TileViT(GridViT):
    """ViT256: pixels [B, 3, H, W] (normalised) -> CLS embedding [B, embed_dim]."""

    def __init__(self, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, **kwargs) -> None:
        super().__init__(embed_dim, depth, num_heads, **kwargs)
        self.patch_size = patch_size
        # img_size=None: any multiple of the patch size is accepted; the table is resized to fit.
        self.patch_embed = PatchEmbed(img_size=None, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.init_weights()

    def tokenize(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        rows, cols = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        return self.patch_embed(x), rows, cols


class RegionViT(GridViT):
    """ViT4K: a grid of tile embeddings [B, in_dim, rows, cols] -> CLS embedding [B, embed_dim]."""

    def __init__(self, in_dim: int = 384, embed_dim: int = 192, depth: int = 6, num_heads: int = 6,
                 drop_rate: float = 0.0, **kwargs) -> None:
        super().__init__(embed_dim, depth, num_heads, **kwargs)
        self.in_dim = in_dim
        self.phi = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU(), nn.Dropout(drop_rate))
        self.init_weights()

    def tokenize(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        rows, cols = x.shape[-2:]
        return self.phi(x.flatten(2).transpose(1, 2)), rows, cols  # row-major: token r*cols + c


def vit256(**kwargs) -> TileViT:
    """The HIPT tile encoder (ViT-S/16, 384-d); keyword arguments override the geometry."""
    return TileViT(**kwargs)


def vit4k(**kwargs) -> RegionViT:
    """The HIPT region encoder (ViT-XS, 384 -> 192-d, 6 blocks); keyword arguments override it."""
    return RegionViT(**kwargs)
