"""Pretrained slide encoders from local weights: slide foundation models over a tile encoder's features
(names as TRIDENT's). Each entry is the architecture in this project's code, checked against the authors' on
random weights (tests/fixtures/slide_encoders), plus what it reads: the tile encoder whose features it
expects and their width, whether it needs the tiles' level-0 coordinates, and how the keys of the authors'
file map onto ours. Weights are never downloaded.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from hipt_e2e.errors import SettingError
from hipt_e2e.io import sha256_file

from .checkpoint import CheckpointError, load_checkpoint, read_state_dict
from .foundation import weights_file
from .longnet import GigaPathSlideEncoder
from .slide import GatedAttentionPool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlideEncoderEntry:
    """A pretrained slide encoder as its authors release and use it."""
    name: str
    tile_encoder: str  # whose features it reads (a name of hipt_e2e.models.foundation.ENCODERS, or TRIDENT's)
    in_dim: int  # their width
    width: int  # the slide embedding's width
    needs_coords: bool  # reads the tiles' level-0 x, y and the level-0 tile size
    release: str  # the authors' file (a local copy of it is what is loaded)
    # keyword arguments -> the module; its forward(features [N, in_dim], coords [N, 2] | None,
    # tile_size_level0 | None) returns the slide embedding [width]
    build: Callable[..., nn.Module]
    renames: tuple[tuple[str, str], ...] = ()  # key prefixes of the authors' file -> ours
    unused: tuple[str, ...] = ()  # key prefixes of the authors' file the slide embedding does not read (their heads)
    trusted: bool = False  # the file pickles more than tensors (unpickled only for these entries)
    layers: str = ""  # its stack of layers (a ModuleList), which layer-wise lr decay counts; "": one stage
    notes: str = ""

    def our_keys(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The authors' state dict under this project's names, without the tensors the embedding does not use."""
        out = {}
        for key, value in state.items():
            if key.startswith(self.unused):
                continue
            for theirs, ours in self.renames:
                if key.startswith(theirs):
                    key = ours + key.removeprefix(theirs)
                    break
            out[key] = value
        return out


class AttentionPoolingEncoder(nn.Module):
    """Gated attention-MIL as a slide encoder: tiles [N, in_dim] -> fc (Linear, ReLU, dropout) -> gated attention
    weights [N] -> the weighted mean of the fc outputs (FEATHER: MIL-Lab's ABMIL) or, with pool_inputs, of the
    tile features themselves (CHIEF's WSI_feature)."""

    def __init__(self, in_dim: int, hidden: int, attention: int, pool_inputs: bool = False, fc_dropout: float = 0.0,
                 dropout: float = 0.25) -> None:
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(fc_dropout))
        self.attn_pool = GatedAttentionPool(hidden, attention, dropout)
        self.pool_inputs = pool_inputs
        self.width = in_dim if pool_inputs else hidden

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None,
                tile_size_level0: int | None = None) -> torch.Tensor:
        pooled, weights = self.attn_pool(self.fc(features))
        return weights @ features if self.pool_inputs else pooled[0]


class MultiHeadAttentionPoolingEncoder(nn.Module):
    """MADELEINE's slide encoder: tiles [N, in_dim] -> 3 x (Linear, LayerNorm, GELU, dropout) to hidden x heads
    channels -> per head a gated attention pooling of its hidden channels (channel c of head h at c * heads + h,
    as the authors' rearrange splits them) -> the heads' pooled vectors, channel-major -> Linear -> [hidden]."""

    def __init__(self, in_dim: int = 512, hidden: int = 512, attention: int = 512, heads: int = 4,
                 dropout: float = 0.1) -> None:
        super().__init__()
        widths = (in_dim, hidden, hidden, hidden * heads)
        self.pre_attn = nn.Sequential(*(layer for a, b in zip(widths, widths[1:])
                                        for layer in (nn.Linear(a, b), nn.LayerNorm(b), nn.GELU(), nn.Dropout(dropout))))
        self.attn = nn.ModuleList(GatedAttentionPool(hidden, attention, 0.25) for _ in range(heads))
        self.projector = nn.Linear(hidden * heads, hidden)
        self.width = hidden

    def forward(self, features: torch.Tensor, coords: torch.Tensor | None = None,
                tile_size_level0: int | None = None) -> torch.Tensor:
        channels = self.pre_attn(features).unflatten(-1, (-1, len(self.attn)))  # [N, hidden, heads]
        pooled = torch.stack([pool(channels[..., h])[0][0] for h, pool in enumerate(self.attn)], dim=-1)
        return self.projector(pooled.flatten())


def _feather(name: str, tile_encoder: str, in_dim: int, release: str) -> SlideEncoderEntry:
    """MIL-Lab's ABMIL 'base' (embed 512, attention 384, gated, one fc layer) as Hugging Face holds it: the
    ABMIL under `model.`, its pretraining classifier unused (TRIDENT embeds with forward_features)."""
    return SlideEncoderEntry(
        name, tile_encoder, in_dim, 512, False, release,
        partial(AttentionPoolingEncoder, in_dim=in_dim, hidden=512, attention=384),
        renames=(("model.patch_embed.0.", "fc.0."), ("model.global_attn.", "attn_pool.")),
        unused=("model.classifier.",))


SLIDE_ENCODERS: dict[str, SlideEncoderEntry] = {entry.name: entry for entry in (
    _feather("feather_uni_v2", "uni_v2", 1536, "MahmoodLab/abmil.base.uni_v2.pc108-24k model.safetensors"),
    _feather("feather", "conch_v15", 768, "MahmoodLab/abmil.base.conch_v15.pc108-24k model.safetensors"),
    SlideEncoderEntry(
        "chief", "ctranspath", 768, 768, False, "hms-dbmi/CHIEF model_weight/CHIEF_pretraining.pth",
        partial(AttentionPoolingEncoder, in_dim=768, hidden=512, attention=256, pool_inputs=True, fc_dropout=0.25),
        renames=(("attention_net.0.", "fc.0."), ("attention_net.3.", "attn_pool.")),
        unused=("classifiers.", "instance_classifiers.", "att_head.", "text_to_vision.", "organ_embedding"),
        notes="CHIEF(size_arg='small'); the embedding is its WSI_feature, which the anatomic site does not change"),
    SlideEncoderEntry(
        "gigapath-slide", "gigapath", 1536, 768, True, "prov-gigapath/prov-gigapath slide_encoder.pth",
        GigaPathSlideEncoder, unused=("encoder.layers.11.", "encoder.layer_norm."), layers="encoder.layers",
        notes="gigapath_slide_enc12l768d, global pooling; the embedding is TRIDENT's, read after layer 11 of 12"),
    SlideEncoderEntry(
        "madeleine", "conch_v1", 512, 512, False, "MahmoodLab/madeleine model.pt", MultiHeadAttentionPoolingEncoder,
        renames=(("wsi_embedders.", ""),), unused=("token_projector.",),
        notes="MADELEINE(stain_encoding=False) as create_model builds it (4 heads, hidden 512, as its launch scripts "
              "train it); the embedding is encode_he's, as TRIDENT's"),
)}


def slide_encoder_entry(name: str) -> SlideEncoderEntry:
    if name not in SLIDE_ENCODERS:
        raise SettingError(f"unknown slide encoder {name!r}: use one of {sorted(SLIDE_ENCODERS)}")
    return SLIDE_ENCODERS[name]


def load_slide_encoder(name: str, weights: str | Path, **build_kwargs) -> tuple[nn.Module, dict[str, str]]:
    """The entry's module with the authors' file loaded strictly (every tensor it uses present and used), in
    eval mode, and {"path", "sha256"} of the file. build_kwargs override the entry's dimensions (tests)."""
    entry = slide_encoder_entry(name)
    file = weights_file(weights)
    module, state = entry.build(**build_kwargs), read_state_dict(file, trusted=entry.trusted)
    try:
        load_checkpoint(module, entry.our_keys(state), strict=True)
    except CheckpointError as error:
        raise CheckpointError(f"{file} does not fit slide encoder {name}: {error}") from None
    record = {"path": str(file.resolve()), "sha256": sha256_file(file)}
    log.info("slide encoder %s: weights %s (sha256 %s)", name, file, record["sha256"][:12])
    return module.eval(), record
