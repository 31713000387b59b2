"""Trained models that describe themselves: architectures, model cards and `load_bundle`.

An architecture is the resolved geometry of each level (a preset with a recipe's changes applied):

    tile:   {encoder: vit, patch_size, embed_dim, depth, num_heads, pos_grid} | {encoder: cnn, cnn, embed_dim, stem}
            | {encoder: NAME, entry, tile_input, trainable, lora_rank, lora_alpha} (a pretrained encoder)
    region: {in_dim, embed_dim, depth, num_heads, pos_grid}
    slide:  {name: vit_wsi, dim, depth, num_heads, dropout} | {name: abmil | fc, dim, hidden, dropout}

Every model a recipe writes gets a card (`model_card.json`) beside it, as timm's pretrained configs: the
architecture, classes, normalisation, geometry, head, base weights and metrics; `load_bundle` rebuilds it.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from hipt_e2e import __version__
from hipt_e2e.config import Settings
from hipt_e2e.errors import SettingError
from hipt_e2e.io import atomic_write_json

from .checkpoint import CheckpointError, load_checkpoint, read_state_dict
from .cnn import cnn256
from .foundation import ENCODERS, EncoderEntry, PretrainedTileEncoder, encoder_entry, is_pretrained, load_stage_weights
from .hipt import HIPT
from .mil import AttentionMIL, RegionFC
from .presets import model_preset
from .slide import vit_wsi
from .vit import vit4k, vit256

if TYPE_CHECKING:  # the sections live beside the encoders they build, which import this module
    from .encoders import RegionModel, TileModel

CARD = "model_card.json"
CARD_FORMAT = "hipt-e2e-model-card"
TILE_ENCODERS = ("vit", "cnn")
SLIDE_MODELS = ("vit_wsi", "abmil", "fc")


def _geometry(preset: str, level: str, changes: Settings) -> dict[str, Any]:
    """A level's geometry: the preset's, with a model section's non-null changes (model.tile, model.region)."""
    return {**model_preset(preset)[level], **{key: value for key, value in changes.to_mapping().items() if value is not None}}


def region_architecture(model: RegionModel) -> dict[str, Any]:
    return _geometry(model.preset, "region", model.region)


def tile_architecture(model: TileModel, trainable: str | int = "all", lora_rank: int = 0,
                      lora_alpha: float | None = None) -> dict[str, Any]:
    """The tile encoder of a model section (a pretrained one's registry entry whole, so cards outlive the registry)."""
    geometry = _geometry(model.preset, "tile", model.tile)
    if model.encoder == "vit":
        return {"encoder": "vit", **geometry}
    if model.encoder == "cnn":
        return {"encoder": "cnn", "cnn": model.cnn, "embed_dim": geometry["embed_dim"], "stem": model.cnn_stem}
    if is_pretrained(model.encoder):
        return {"encoder": model.encoder, "entry": dataclasses.asdict(encoder_entry(model.encoder, model.timm_kwargs)),
                "tile_input": model.tile_input, "trainable": trainable, "lora_rank": lora_rank, "lora_alpha": lora_alpha}
    raise SettingError(f"model.encoder must be one of {TILE_ENCODERS}, timm:ARCH or a pretrained encoder "
                     f"({', '.join(ENCODERS)}), got {model.encoder!r}")


def tile_encoder_from(arch: Mapping[str, Any], drop_path_rate: float = 0.0) -> nn.Module:
    """A random tile encoder of an architecture (a pretrained one's base weights are loaded after)."""
    if "entry" in arch:
        return PretrainedTileEncoder(arch["encoder"], EncoderEntry(**arch["entry"]), arch["tile_input"],
                                     arch["trainable"], arch["lora_rank"], arch["lora_alpha"], drop_path_rate)
    settings = {key: value for key, value in arch.items() if key not in ("encoder", "cnn")}
    if arch["encoder"] == "cnn":
        return cnn256(arch["cnn"], **settings, drop_path_rate=drop_path_rate)
    return vit256(**settings, drop_path_rate=drop_path_rate)


def tile_width(arch: Mapping[str, Any]) -> int:
    """The embedding width of a tile architecture (ViT4K's in_dim follows it)."""
    return arch["entry"]["width"] if "entry" in arch else arch["embed_dim"]


def tile_normalisation(arch: Mapping[str, Any], configured: str) -> str:
    """The normalisation tiles need: a pretrained encoder's own (its training statistics), else the configured."""
    return arch["entry"]["normalisation"] if "entry" in arch else configured


def trained_keys(model: HIPT, frozen_tile: bool) -> list[str]:
    """The state-dict keys training can change (a run saves these): all but a pretrained tile encoder's frozen
    base, which its card names."""
    tile = model.tile_encoder
    keys = list(model.state_dict())
    if not isinstance(tile, PretrainedTileEncoder) or (tile.trainable == "all" and not frozen_tile):
        return keys
    trained = set() if frozen_tile else {name for name, _ in tile.trained_parameters()}
    if not frozen_tile and tile.trainable != "lora":  # trained blocks in train mode update their buffers
        trained |= {name for name, _ in tile.named_buffers()}
    return [key for key in keys if not key.startswith("tile_encoder.") or key.removeprefix("tile_encoder.") in trained]


def slide_model_from(arch: Mapping[str, Any], n_classes: int) -> nn.Module:
    settings = {key: value for key, value in arch.items() if key != "name"}
    builders = {"vit_wsi": vit_wsi, "abmil": AttentionMIL, "fc": RegionFC}
    if arch["name"] not in builders:
        raise SettingError(f"unknown slide model {arch['name']!r}; choose one of {SLIDE_MODELS}")
    return builders[arch["name"]](n_classes, **settings)


def hipt_from(arch: Mapping[str, Any], n_classes: int, **settings: Any) -> HIPT:
    """The random HIPT of an architecture (settings go to HIPT); an fc slide level becomes an identity."""
    slide = arch["slide"]
    return HIPT(tile_encoder_from(arch["tile"], settings.pop("drop_path_rate", 0.0)), vit4k(**arch["region"]),
                nn.Identity() if slide["name"] == "fc" else slide_model_from(slide, n_classes), **settings)


def write_card(weights: str | Path, card: Mapping[str, Any]) -> Path:
    """model_card.json beside `weights` (atomic), with the format, the package version and the weights file."""
    weights = Path(weights)
    path = weights.parent / CARD
    atomic_write_json(path, {"format": CARD_FORMAT, "version": 1, "package_version": __version__,
                             "weights": weights.name, **card})
    return path


def read_card(path: str | Path) -> tuple[dict[str, Any], Path]:
    """(card, its path) from a card file or a folder holding one; a clear error otherwise."""
    path = Path(path)
    card_path = path / CARD if path.is_dir() else path
    if not card_path.is_file():
        raise FileNotFoundError(f"{path}: no {CARD} (written beside every model this toolkit trains: e2e, "
                                "train_wsi and train_fc folds, DINO exports); name the weights with the model.* keys")
    card = json.loads(card_path.read_text())
    if card.get("format") != CARD_FORMAT:
        raise SettingError(f"{card_path} is not a hipt-e2e model card (format {card.get('format')!r})")
    return card, card_path


def card_beside(weights: str | Path) -> Path | None:
    """The model card of the run that wrote a weights file (its folder's), if there is one."""
    weights = Path(weights)
    card = weights / CARD if weights.is_dir() else weights.parent / CARD
    return card if card.is_file() else None


@dataclass
class Bundle:
    """A trained model ready for prediction: HIPT encoders (+ slide model), or + a region FC head."""
    model: HIPT
    fc: RegionFC | None
    classes: list[str]
    card: dict[str, Any]

    @property
    def vote(self) -> str:
        return self.card.get("vote", "majority")


def load_bundle(path: str | Path, trusted: bool = False) -> Bundle:
    """Rebuild the model a card describes and load its weights strictly: an end-to-end card ("hipt") holds it
    in one file, a staged one ("slide_model") the slide model (or FC) and its encoders under "stages"."""
    card, card_path = read_card(path)
    weights = card_path.parent / card["weights"]
    classes = list(card["classes"])
    if card["kind"] == "hipt":
        model = hipt_from(card["architecture"], len(classes), tile_px=card["tile_px"],
                          normalisation=card["normalisation"])
        if card.get("tile_base"):  # the run saved what trained; the base comes from the authors' file
            _load_base(model.tile_encoder, card["tile_base"], card_path)
            state = read_state_dict(weights)
            expected = trained_keys(model, card["frozen"]["tile"])
            if sorted(state) != sorted(expected):
                raise CheckpointError(f"{weights} does not hold what its card says trained: missing "
                                      f"{sorted(set(expected) - set(state))[:3]}, unexpected {sorted(set(state) - set(expected))[:3]}")
            state = {**model.state_dict(), **state}
        else:
            state = weights
        load_checkpoint(model, state, trusted=trusted, strict=True)
        return Bundle(model.eval(), None, classes, card)
    if card["kind"] != "slide_model":
        raise SettingError(f"{card_path}: a {card['kind']} card describes one encoder, not a model that predicts "
                         "slides; give the card of an e2e, train_wsi or train_fc fold")
    stages = card.get("stages")
    if not stages:
        raise SettingError(f"{card_path}: this slide model's bags were not embedded by embed_tiles / embed_regions, "
                         "so its card names no encoders; give model.tile_encoder and model.region_encoder instead")
    arch = {"tile": stages["tile"]["architecture"], "region": stages["region"]["architecture"],
            "slide": card["architecture"]["slide"]}
    model = hipt_from(arch, len(classes), tile_px=card["tile_px"], normalisation=card["normalisation"])
    for stage, module in (("tile", model.tile_encoder), ("region", model.region_encoder)):
        if stages[stage].get("sha256"):
            _load_base(module, stages[stage], card_path)
        else:
            load_checkpoint(module, stages[stage]["weights"], trusted=trusted, strict=True)
    fc = slide_model_from(arch["slide"], len(classes)) if arch["slide"]["name"] == "fc" else None
    load_checkpoint(fc if fc is not None else model.slide_model, weights, trusted=trusted, strict=True)
    return Bundle(model.eval(), fc.eval() if fc is not None else None, classes, card)


def _load_base(encoder: nn.Module, base: Mapping[str, str], card_path: Path) -> None:
    """A pretrained tile encoder's weights as a card names them: the same file (by sha256) or an error."""
    path = base.get("path") or base["weights"]
    if load_stage_weights(encoder, path)["sha256"] != base["sha256"]:
        raise CheckpointError(f"{card_path}: the tile encoder's base weights {path} are not the file the model "
                              f"was trained on (sha256 differs from {base['sha256']}); restore that file")
