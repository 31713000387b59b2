"""Pretrained tile encoders from local weights: the pathology foundation models labs already use (UNI,
Virchow, H-optimus, Prov-GigaPath, Lunit, kaiko, CTransPath), CLAM's truncated ImageNet ResNet-50, or any timm
model.

Each registry entry (names as TRIDENT's) is a timm architecture plus what its model card prescribes: input
size, resize and crop, normalisation, how the embedding is formed, precision, training resolution and the
released file. Weights are never downloaded. Tiles arrive normalised at the shards' tile size and are
resized on the device: resizing is linear with weights summing to 1, so it commutes with normalisation.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed, to_2tuple
from timm.models import swin_transformer
from torch import nn

from hipt_e2e.errors import SettingError
from hipt_e2e.io import sha256_file

from .checkpoint import CheckpointError, load_checkpoint, read_state_dict
from .lora import LORA_KEYS, LoRALinear, add_lora

log = logging.getLogger(__name__)

IMAGENET = "imagenet"
SNAPSHOT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")
EMBEDDINGS = ("cls", "cls+mean", "avgpool", "pooled")  # pooled: what the timm model itself returns


@dataclass(frozen=True)
class EncoderEntry:
    """A pretrained tile encoder as its authors release and use it."""
    arch: str  # timm architecture
    kwargs: Mapping[str, Any]  # timm.create_model kwargs (num_classes=0 is always added)
    width: int  # embedding width
    input_px: int  # the model's input size
    resize: int  # tiles are resized to this side (a no-op when they have it), then centre cropped to input_px
    interpolation: str  # of the resize: bilinear | bicubic
    normalisation: str  # a name in hipt_e2e.normalise.NORMALISATIONS
    embedding: str  # cls | cls+mean (CLS and the mean of the patch tokens, registers excluded) | avgpool
    precision: str  # TRIDENT's autocast choice for it (fp32 | fp16 | bf16); runs use their mixed_precision setting
    mpp: float  # microns per pixel it was trained at
    release: str  # where the authors publish the weights (a local copy of that file is what is loaded)
    truncate_after: str | None = None  # CNNs: keep the stages up to this one (CLAM's ResNet-50: layer3)
    notes: str = ""


class ConvStem(nn.Module):
    """CTransPath's patch embedding in place of Swin's 4 x 4 patchify: two 3 x 3 stride-2 conv-BN-ReLU
    (embed_dim/8, embed_dim/4 channels), a 1 x 1 conv to embed_dim, then Swin's LayerNorm; channels last, as timm's
    Swin takes it. Submodules numbered as in the released file (proj.0 .. proj.6, norm)."""

    def __init__(self, img_size: int | tuple[int, int] = 224, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 96, norm_layer: type[nn.Module] | None = None, **_: Any) -> None:
        super().__init__()  # **_: timm's strict_img_size and output_fmt, fixed here (224 px in, channels last out)
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        widths = (in_chans, embed_dim // 8, embed_dim // 4)
        stem = [layer for c_in, c_out in zip(widths, widths[1:]) for layer in
                (nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())]
        self.proj = nn.Sequential(*stem, nn.Conv2d(widths[-1], embed_dim, 1))
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


def _swiglu_vit(**kwargs: Any) -> dict[str, Any]:
    return {**kwargs, "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}


_VIT = {"init_values": 1e-5, "dynamic_img_size": True}
_VIRCHOW = _swiglu_vit(img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="", dynamic_img_size=True)


def _hoptimus(version: int) -> EncoderEntry:
    return EncoderEntry("vit_giant_patch14_reg4_dinov2", {"img_size": 224, "init_values": 1e-5, "global_pool": "token",
                                                          "dynamic_img_size": True},
                        1536, 224, 224, "bilinear", "hoptimus", "cls", "fp16", 0.5,
                        f"bioptimus/H-optimus-{version} pytorch_model.bin",
                        notes="trained on 224 px tiles at 0.5 um/px (no resize): shards with --tile-px 224 keep that")


def _kaiko(arch: str, width: int) -> EncoderEntry:
    return EncoderEntry(arch, {"dynamic_img_size": True}, width, 224, 224, "bilinear", "hipt", "cls", "fp32", 0.5,
                        f"1aurent/{arch}.kaiko_ai_towards_large_pathology_fms model.safetensors")


ENCODERS: dict[str, EncoderEntry] = {
    "resnet50": EncoderEntry(
        "resnet50", {}, 1024, 224, 224, "bilinear", IMAGENET, "avgpool", "fp32", 0.5,
        "torchvision ImageNet IMAGENET1K_V1 (resnet50-0676ba61.pth) or timm/resnet50.tv_in1k model.safetensors",
        truncate_after="layer3", notes="CLAM's baseline: stages to layer3, mean-pooled; CLAM resizes to 224 "
                                       "(fully convolutional: model.tile_input=native runs 256 px tiles as they are)"),
    "uni_v1": EncoderEntry("vit_large_patch16_224", {"img_size": 224, "patch_size": 16, **_VIT}, 1024, 224, 224,
                           "bilinear", IMAGENET, "cls", "fp16", 0.5, "MahmoodLab/UNI pytorch_model.bin"),
    "uni_v2": EncoderEntry(
        "vit_giant_patch14_224",
        _swiglu_vit(img_size=224, patch_size=14, depth=24, num_heads=24, embed_dim=1536, mlp_ratio=2.66667 * 2,
                    no_embed_class=True, reg_tokens=8, **_VIT),
        1536, 224, 224, "bilinear", IMAGENET, "cls", "bf16", 0.5, "MahmoodLab/UNI2-h pytorch_model.bin"),
    "virchow": EncoderEntry("vit_huge_patch14_224", _VIRCHOW, 2560, 224, 224, "bicubic", IMAGENET, "cls+mean", "fp16",
                            0.5, "paige-ai/Virchow pytorch_model.bin"),
    "virchow2": EncoderEntry("vit_huge_patch14_224", {**_VIRCHOW, "reg_tokens": 4}, 2560, 224, 224, "bicubic", IMAGENET,
                             "cls+mean", "fp16", 0.5, "paige-ai/Virchow2 pytorch_model.bin",
                             notes="trained on mixed 0.25-2 um/px"),
    **{f"hoptimus{version}": _hoptimus(version) for version in (0, 1)},
    "gigapath": EncoderEntry(
        "vit_giant_patch14_dinov2", {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40,
                                     "num_heads": 24, "init_values": 1e-5, "mlp_ratio": 5.33334,
                                     "dynamic_img_size": True},
        1536, 224, 256, "bicubic", IMAGENET, "cls", "fp16", 0.5, "prov-gigapath/prov-gigapath pytorch_model.bin",
        notes="Resize 256 + CenterCrop 224, as its model card"),
    "lunit-vits8": EncoderEntry(
        "vit_small_patch8_224", {"dynamic_img_size": True}, 384, 224, 224, "bilinear", "lunit", "cls", "fp32", 0.5,
        "1aurent/vit_small_patch8_224.lunit_dino model.safetensors (or Lunit's dino_vit_small_patch8_ep200.torch)",
        notes="Lunit's training statistics (TRIDENT's hub config applies ImageNet's)"),
    **{f"kaiko-vit{size[0]}{patch}": _kaiko(f"vit_{size}_patch{patch}_224", width)
       for size, width in (("small", 384), ("base", 768)) for patch in (16, 8)},
    "kaiko-vitl14": EncoderEntry(  # built as kaiko's hubconf builds it: timm's default 518 px, a 37 x 37 table
        "vit_large_patch14_reg4_dinov2", {"dynamic_img_size": True}, 1024, 224, 224, "bilinear", "hipt", "cls", "fp32",
        0.5, "kaiko-ai/towards_large_pathology_fms vitl14.pth, or 1aurent/vit_large_patch14_reg4_224."
        "kaiko_ai_towards_large_pathology_fms model.safetensors (its 16 x 16 table resampled as timm loads it)"),
    "ctranspath": EncoderEntry(  # CHIEF's tile encoder; TRIDENT: 256 px tiles at 10x, Resize(224), fp32
        "swin_tiny_patch4_window7_224", {"embed_layer": "ConvStem"}, 768, 224, 224, "bilinear", IMAGENET, "pooled",
        "fp32", 1.0, "MahmoodLab/hest-bench fm_v1/ctranspath/CHIEF_CTransPath.pth (or TransPath's ctranspath.pth)",
        notes="Swin-T with a convolutional stem; 224 px input only (tile_input=native is refused)"),
}
TIMM_PREFIX = "timm:"


def encoder_entry(name: str, timm_kwargs: Mapping[str, Any] | None = None) -> EncoderEntry:
    """The registry entry of `name`; for `timm:ARCH` one of that timm model (kwargs from model.timm_kwargs) at
    224 px, ImageNet statistics and its own pooled output; a clear error for anything else."""
    if name.startswith(TIMM_PREFIX):
        arch, kwargs = name.removeprefix(TIMM_PREFIX), dict(timm_kwargs or {})
        width = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs).num_features
        return EncoderEntry(arch, kwargs, width, 224, 224, "bilinear", IMAGENET, "pooled", "fp32", 0.5, "your own file")
    if name not in ENCODERS:
        raise SettingError(f"unknown tile encoder {name!r}: use vit, cnn, timm:ARCH or one of {sorted(ENCODERS)}")
    if timm_kwargs:
        raise SettingError(f"model.timm_kwargs is for timm:ARCH encoders; {name} is built as its authors release it")
    return ENCODERS[name]


def is_pretrained(name: str) -> bool:
    return name in ENCODERS or name.startswith(TIMM_PREFIX)


def weights_file(path: str | Path) -> Path:
    """A weights file, or the weights file of a local Hugging Face snapshot folder."""
    path = Path(path)
    if path.is_dir():
        snapshots = sorted((path / "snapshots").glob("*"))  # none when there is no snapshots/ folder
        folder = snapshots[0] if len(snapshots) == 1 else path
        for name in SNAPSHOT_FILES:
            if (folder / name).is_file():
                return folder / name
        raise FileNotFoundError(f"{path}: a folder without {' or '.join(SNAPSHOT_FILES)} (give the weights file, "
                                "or the Hugging Face snapshot folder that holds it)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    return path


def _resolved_layers(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Entries name layers by string (JSON in model cards); timm wants the classes."""
    out = dict(kwargs)
    if isinstance(out.get("mlp_layer"), str):
        out["mlp_layer"] = getattr(timm.layers, out["mlp_layer"])
    if isinstance(out.get("act_layer"), str):
        out["act_layer"] = timm.layers.get_act_layer(out["act_layer"].lower())
    if out.get("embed_layer") == "ConvStem":
        out["embed_layer"] = ConvStem
    return out


class PretrainedTileEncoder(nn.Module):
    """Normalised tiles [B, 3, t, t] at the shards' tile px -> embeddings [B, width], as the entry's card.

    tile_input: "resize" to the entry's input, or "native" (the tile's own size). trainable: what
    `requires_grad_(True)` trains: "all", the last k blocks (or CNN stages) and the final norm, or "lora"
    (with lora_rank > 0: adapters on every qkv); the rest stays frozen and in eval mode.
    """

    def __init__(self, name: str, entry: EncoderEntry, tile_input: str = "resize", trainable: str | int = "all",
                 lora_rank: int = 0, lora_alpha: float | None = None, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        if tile_input not in ("resize", "native"):
            raise SettingError(f"model.tile_input must be resize or native, got {tile_input!r}")
        if entry.embedding not in EMBEDDINGS:
            raise SettingError(f"tile encoder {name}: embedding {entry.embedding!r} is not one of {EMBEDDINGS}")
        if trainable == "lora" and not lora_rank:
            raise SettingError("model.tile_trainable=lora needs model.lora.rank > 0")
        self.name, self.entry, self.tile_input = name, entry, tile_input
        kwargs = {**_resolved_layers(entry.kwargs), "num_classes": 0}
        if drop_path_rate:
            kwargs["drop_path_rate"] = drop_path_rate
        self.model = timm.create_model(entry.arch, pretrained=False, **kwargs)
        if tile_input == "native" and isinstance(self.model, swin_transformer.SwinTransformer):
            raise SettingError(f"model.tile_input=native: {name} is a Swin built for {entry.input_px} px input; use resize")
        self.dropped = self._truncate()
        if self._output_width() != entry.width:
            raise ValueError(f"tile encoder {name}: {entry.arch} gives {self._output_width()}-d embeddings, "
                             f"the entry says {entry.width}")
        self.embed_dim = self.num_features = entry.width
        if lora_rank:
            add_lora(self.model, "qkv", lora_rank, lora_alpha)
            trainable = "lora"
        self.trainable = trainable
        self.weights: dict[str, str] | None = None  # the base weights loaded: path and sha256

    def _truncate(self) -> tuple[str, ...]:
        """CNN entries: the stages after `truncate_after` (and the classifier) are replaced by identities."""
        if not self.entry.truncate_after:
            return ()
        names = [name for name, _ in self.model.named_children()]
        dropped = tuple(names[names.index(self.entry.truncate_after) + 1:])
        for name in dropped:
            setattr(self.model, name, nn.Identity())
        return dropped

    def _output_width(self) -> int:
        if self.entry.truncate_after:
            return next(info["num_chs"] for info in self.model.feature_info if info["module"] == self.entry.truncate_after)
        return self.model.num_features * (2 if self.entry.embedding == "cls+mean" else 1)

    def load_pretrained(self, path: str | Path) -> dict[str, str]:
        """Load the authors' weights (or a hipt-e2e export of this encoder) strictly; returns {"path", "sha256"},
        also kept as self.weights. Stages cut off by truncation may be in the file; adapters keep their values."""
        file = weights_file(path)
        state = read_state_dict(file)
        if state and all(key.startswith("model.") for key in state):
            state = {key.removeprefix("model."): value for key, value in state.items()}
        state = {key: value for key, value in state.items() if key.split(".")[0] not in self.dropped}
        if isinstance(self.model, swin_transformer.SwinTransformer) and "layers.0.downsample.norm.weight" in state:
            # timm's own conversion of the original Swin layout (CTransPath's file: stage 0 ends downsampling): each
            # stage's downsampling moves to the start of the next (layers.i -> layers.i+1.downsample), and the
            # buffers relative_position_index and attn_mask, which timm recomputes, are dropped. A file in timm's
            # layout is left alone (timm 1.0.3's filter would shift it again).
            state = swin_transformer.checkpoint_filter_fn(state, self.model)
        state = self._resampled_positions(state)
        for name, module in self.model.named_modules():
            if isinstance(module, LoRALinear):
                for part in ("weight", "bias"):
                    if f"{name}.{part}" in state:
                        state[f"{name}.base.{part}"] = state.pop(f"{name}.{part}")
                state.update({f"{name}.{key}": getattr(module, key) for key in LORA_KEYS})
        try:
            load_checkpoint(self.model, state, strict=True)
        except CheckpointError as error:
            raise CheckpointError(f"{file} does not fit tile encoder {self.name} ({self.entry.arch}): {error}") from None
        self.weights = {"path": str(file.resolve()), "sha256": sha256_file(file)}
        log.info("tile encoder %s: weights %s (sha256 %s)", self.name, file, self.weights["sha256"][:12])
        return self.weights

    def _resampled_positions(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A ViT file whose square position table has another size (e.g. kaiko's L14 at 37 x 37 or a 16 x 16
        copy), resampled to the model's as timm loads one (bicubic, antialiased, prefix tokens kept)."""
        table, own = state.get("pos_embed"), getattr(self.model, "pos_embed", None)
        if table is None or own is None or table.shape == own.shape:
            return state
        prefix = 0 if getattr(self.model, "no_embed_class", False) else self.model.num_prefix_tokens
        side = math.isqrt(table.shape[1] - prefix)
        if side * side != table.shape[1] - prefix or table.shape[2] != own.shape[2]:
            return state  # not a square table of this width: the strict load names the mismatch
        resampled = resample_abs_pos_embed(table, new_size=list(self.model.patch_embed.grid_size),
                                           old_size=[side, side], num_prefix_tokens=prefix, interpolation="bicubic",
                                           antialias=True)
        log.info("tile encoder %s: position table %d x %d resampled to %s", self.name, side, side,
                 tuple(self.model.patch_embed.grid_size))
        return {**state, "pos_embed": resampled}

    def trained_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(name, parameter) of what the policy trains."""
        if self.trainable == "all":
            yield from self.named_parameters()
        elif self.trainable == "lora":
            yield from ((n, p) for n, p in self.named_parameters() if n.rsplit(".", 1)[-1] in LORA_KEYS)
        else:  # the last k blocks and the final norm
            tail = {id(p) for block in self._tail() for p in block.parameters()}
            tail |= {id(p) for n, p in self.model.named_parameters() if n.startswith(("norm.", "fc_norm."))}
            yield from ((n, p) for n, p in self.named_parameters() if id(p) in tail)

    def _tail(self) -> list[nn.Module]:
        """The last `trainable` of the units from pixels up: ViT blocks, or a Swin's or a CNN's stages."""
        if hasattr(self.model, "blocks"):
            blocks = list(self.model.blocks)
        elif isinstance(self.model, swin_transformer.SwinTransformer):  # its stages
            blocks = list(self.model.layers)
        else:  # a CNN's stages, less those truncation dropped
            blocks = [stage for name, stage in self.model.named_children()
                      if name.startswith("layer") and not isinstance(stage, nn.Identity)]
        if not 0 <= int(self.trainable) <= len(blocks):
            raise SettingError(f"model.tile_trainable={self.trainable}: {self.name} has {len(blocks)} blocks")
        return blocks[len(blocks) - int(self.trainable):]

    def train(self, mode: bool = True) -> PretrainedTileEncoder:
        """Only what trains is in training mode: frozen blocks keep e.g. their BatchNorm statistics."""
        super().train(mode)
        if mode and self.trainable != "all":
            self.model.eval()
            if self.trainable != "lora":
                for block in self._tail():
                    block.train()
        return self

    def requires_grad_(self, requires_grad: bool = True) -> PretrainedTileEncoder:
        super().requires_grad_(False)
        if requires_grad:
            for _, param in self.trained_parameters():
                param.requires_grad_(True)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tiles -> the model's input, as the card's transform (resize, centre crop)."""
        if self.tile_input == "native":
            return x
        size = self.entry.resize
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode=self.entry.interpolation, antialias=True,
                              align_corners=False)
        crop = self.entry.input_px
        if size != crop:
            top = (size - crop) // 2  # torchvision's CenterCrop rounds the same way
            x = x[..., top:top + crop, top:top + crop]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prepare(x)
        embedding = self.entry.embedding
        if embedding == "pooled":
            return self.model(x)
        features = self.model.forward_features(x)
        if embedding == "avgpool":
            return features.mean(dim=(-2, -1))
        cls = features[:, 0]
        if embedding == "cls":
            return cls
        return torch.cat([cls, features[:, self.model.num_prefix_tokens:].mean(dim=1)], dim=-1)


def run_precision(encoder: nn.Module, setting: str | None) -> str | None:
    """The precision a run embeds in: its setting (or `accelerate launch --mixed_precision`'s), else a pretrained
    entry's own on a GPU (fp32 -> no) and float32 on the CPU, where half precision is emulated and slow."""
    if setting is not None or os.environ.get("ACCELERATE_MIXED_PRECISION") or not isinstance(encoder, PretrainedTileEncoder):
        return setting
    return {"fp32": "no"}.get(encoder.entry.precision, encoder.entry.precision) if torch.cuda.is_available() else "no"


def load_stage_weights(module: nn.Module, source: str | Path, *, trusted: bool = False) -> dict[str, str] | None:
    """Strictly load weights into one stage: a pretrained tile encoder its authors' file (returns its path and
    sha256), any other module a checkpoint of this toolkit or a released HIPT one."""
    if isinstance(module, PretrainedTileEncoder):
        return module.load_pretrained(source)
    load_checkpoint(module, source, trusted=trusted, strict=True)
    return None


def require_weights(encoder: nn.Module, source: str | Path | None, key: str) -> None:
    """A pretrained tile encoder without its weights file is an error, never a silent random encoder."""
    if source is None and isinstance(encoder, PretrainedTileEncoder):
        raise SettingError(f"model.encoder={encoder.name} is a pretrained encoder: give its weights with "
                         f"{key}=FILE_OR_SNAPSHOT_FOLDER (released as {encoder.entry.release}); nothing is downloaded")
