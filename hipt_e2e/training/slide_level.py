"""Slide-level training with cross-validation, the staged path's last stage: bags of region embeddings ->
`vit_wsi` or attention-MIL (a slide per step), or an FC on single regions whose slide prediction is a vote.
Processes split each epoch's units; evaluation runs on the small in-memory bags on every process.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from torch import nn

from hipt_e2e.config import Settings, bound, section
from hipt_e2e.data.embeddings import SlideBag, read_slide_bags, unit_bags
from hipt_e2e.data.lineage import REGION_EMBEDDINGS
from hipt_e2e.data.storage import StorageSettings
from hipt_e2e.embedding import slide_encoder_bags
from hipt_e2e.errors import SettingError
from hipt_e2e.evaluation.metrics import classification_metrics, selection_key
from hipt_e2e.evaluation.splits import Fold
from hipt_e2e.io import atomic_write_json
from hipt_e2e.lineage import read_lineage
from hipt_e2e.models.bundle import slide_model_from, write_card
from hipt_e2e.models.mil import RegionFC, SlideEncoderClassifier, SlideModel, Vote, vote
from hipt_e2e.models.slide_encoders import load_slide_encoder, slide_encoder_entry
from hipt_e2e.progress import progress
from hipt_e2e.runtime import Precision, make_accelerator
from hipt_e2e.training.checkpointing import export_safetensors
from hipt_e2e.training.folds import FoldSettings, Imbalance, run_folds
from hipt_e2e.training.recipe import recipe_settings
from hipt_e2e.training.tracking import LogWith, start_tracking, stop_tracking, track, tracker_settings

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class SlideData(StorageSettings):
    """The `data` section: the bags, and which of each fold's training slides are trained on."""

    shards: str | None = None  # region-embedding bags (recipes/embed_regions.py); model.slide_encoder: token grids
    min_tile_tissue: float = bound(1e-3, 0.0, 1.0)  # model.slide_encoder: tiles with less tissue are left out
    train_fraction: float = bound(1.0, 0.0, 1.0)  # stratified share of each fold's training slides (learning curves)
    dominant_class: str | None = None  # subsample the other classes' training slides to 1 : dominant_ratio of it
    dominant_ratio: float = bound(4.0, 1.0)


@dataclass(frozen=True)
class SlideOptim(Settings):
    """The `optim` section: Adam."""

    lr: float = bound(2e-4, 0.0)
    layer_decay: float = bound(0.95, 0.0, 1.0)  # model.slide_encoder: lr factor per layer below the head (param_groups)
    weight_decay: float = bound(1e-5, 0.0)
    epochs: int = bound(20, 1)
    accumulate: int = bound(1, 1)  # training units (slides; fc: batches of regions) per optimizer step
    batch_regions: int = bound(256, 1)  # fc: regions per batch


@dataclass(frozen=True)
class SlideTrain(Settings):
    log_with: LogWith = "none"  # none | tensorboard | mlflow | wandb, one run, tags per fold


@dataclass(frozen=True)
class SlideSettings(FoldSettings):
    """Slide-level training's settings (recipes/train_wsi.py; the ablations on it add theirs): the
    cross-validation (FoldSettings) with class-balanced sampling by default, and the sections below."""

    imbalance: Imbalance = "balanced_sampling"  # none | weighted_loss | balanced_sampling (weight N / N_class)
    data: SlideData = section(SlideData)
    model: SlideModel = section(SlideModel)
    optim: SlideOptim = section(SlideOptim)
    vote: Vote = "majority"  # fc only: majority | mean
    mixed_precision: Precision = "no"
    train: SlideTrain = section(SlideTrain)


@dataclass(frozen=True)
class FCSettings(SlideSettings):
    """recipes/train_fc.py's settings: the FC on single region embeddings, at a higher learning rate."""

    model: SlideModel = field(default_factory=lambda: SlideModel(name="fc"))
    optim: SlideOptim = field(default_factory=lambda: SlideOptim(lr=1e-3))


def build_slide_model(model: SlideModel, n_classes: int, dim: int) -> nn.Module:
    if model.slide_encoder is None:
        return slide_model_from(model.architecture(dim), n_classes)
    entry = slide_encoder_entry(model.slide_encoder)
    encoder, base = load_slide_encoder(entry.name, model.weights)
    return SlideEncoderClassifier(encoder, entry.width, n_classes, model.dropout, entry.needs_coords, entry.layers, base)


def param_groups(model: nn.Module, optim: SlideOptim) -> list[dict[str, Any]]:
    """Adam's parameter groups: all at optim.lr, but a fine-tuned slide encoder's with layer-wise lr decay as
    Prov-GigaPath's finetune/ sets them (BEiT's rule): a parameter `depth` layers below the head at
    lr * layer_decay ** depth (SlideEncoderClassifier.depths), so an encoder of one stage (FEATHER, CHIEF,
    MADELEINE) trains at lr * layer_decay and its head at lr."""
    if not isinstance(model, SlideEncoderClassifier):
        return [{"params": list(model.parameters()), "lr": optim.lr}]
    depths, groups = model.depths(), defaultdict(list, {0: list(model.head.parameters())})
    for name, parameter in model.encoder.named_parameters():
        groups[depths[name]].append(parameter)
    return [{"params": params, "lr": optim.lr * optim.layer_decay ** depth} for depth, params in sorted(groups.items())]


def embedding_stages(bags: str | Path | Mapping) -> dict[str, Any] | None:
    """The encoders (architecture, weights), normalisation and geometry that region embeddings were made with,
    from their lineage; None when they cannot be rebuilt (other bags, random encoders, unhashed authors' files)."""
    lineage = read_lineage(bags)
    tile, region = lineage.tile_encoder, lineage.region_encoder
    if lineage.kind != REGION_EMBEDDINGS or tile is None or region is None or not (tile.weights and region.weights):
        return None
    pretrained = "entry" in tile.architecture  # its authors' file, named by its hash too
    if pretrained and tile.sha256 is None:
        return None
    return {"tile": {"architecture": dict(tile.architecture), "weights": tile.weights,
                     **({"sha256": tile.sha256} if pretrained else {})},
            "region": {"architecture": dict(region.architecture), "weights": region.weights},
            "normalisation": tile.normalisation, **lineage.geometry.pixel_fields()}


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """N / (K * N_class): 1 for every class when balanced. A class absent from training gets 0."""
    counts = torch.bincount(torch.as_tensor(labels), minlength=n_classes).float()
    return torch.where(counts > 0, len(labels) / (n_classes * counts.clamp(min=1)), torch.zeros_like(counts))


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy with each sample's loss scaled by its class weight, then averaged. Not torch's
    `CrossEntropyLoss(weight=...)`, whose mean divides by the summed weights: with one slide per step that
    cancels the weight exactly."""

    def __init__(self, weights: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("weights", weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = nn.functional.cross_entropy(logits, target, reduction="none")
        return (loss * self.weights[target] if self.weights is not None else loss).mean()


def epoch_order(labels: Sequence[int], n_classes: int, *, balanced: bool, seed: int, epoch: int,
                rank: int = 0, world_size: int = 1) -> list[int]:
    """This process's training units for an epoch: a seeded permutation, or (balanced) a draw with
    replacement with probability proportional to N / N_class. Padded so every process gets as many."""
    generator = torch.Generator().manual_seed(seed * 10_007 + epoch)
    if balanced:
        weights = class_weights(labels, n_classes)[torch.as_tensor(labels)]
        order = torch.multinomial(weights, len(labels), replacement=True, generator=generator)
    else:
        order = torch.randperm(len(labels), generator=generator)
    order = order.tolist()
    order += order[: (-len(order)) % world_size]
    return order[rank::world_size]


def _slide_probs(model: nn.Module, bag: SlideBag, device: torch.device, vote_method: str) -> np.ndarray:
    logits = model(bag.features.to(device))
    probs = logits.float().softmax(dim=-1).cpu().numpy()
    return vote(probs, vote_method) if isinstance(model, RegionFC) else probs[0]


@torch.no_grad()
def predict(model: nn.Module, bags: Sequence[SlideBag], vote_method: str = "majority") -> np.ndarray:
    """Slide probabilities [n_slides, n_classes]."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    probs = np.stack([_slide_probs(model, bag, device, vote_method) for bag in bags])
    model.train(was_training)
    return probs


class TrainingUnits:
    """What one epoch iterates: slides (bag models), or single regions batched (the FC)."""

    def __init__(self, bags: Sequence[SlideBag], classes: Sequence[str], per_region: bool, batch: int):
        self.per_region, self.batch = per_region, batch
        if per_region:
            self.features = torch.cat([bag.features for bag in bags])
            self.labels = torch.cat([torch.full((len(bag.features),), classes.index(bag.label)) for bag in bags])
        else:
            self.bags = list(bags)
            self.labels = torch.tensor([classes.index(bag.label) for bag in bags])

    def batches(self, order: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self.per_region:
            return [(self.bags[i].features, self.labels[i:i + 1]) for i in order]
        index = torch.tensor(order)
        return [(self.features[chunk], self.labels[chunk]) for chunk in index.split(self.batch)]


def accumulation_step(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer,
                      group: Sequence[T], loss_of: Callable[[int, T], torch.Tensor], clip_grad: float = 0.0) -> float:
    """One optimizer step on the averaged gradient of a group of micro-batches (loss_of(n, item): the n-th's
    loss); returns their summed loss. Gradients sync after the last micro-batch only, and each loss is divided
    by the group size, so k processes x a micro-batches equal 1 process x k*a. clip_grad > 0: global norm."""
    total = 0.0
    for n, item in enumerate(group):
        sync = n == len(group) - 1
        with (contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast()):
            loss = loss_of(n, item)
            accelerator.backward(loss / len(group))
        total += loss.item()
    if clip_grad > 0:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def train_epoch(accelerator: Accelerator, model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                batches: list[tuple[torch.Tensor, torch.Tensor]], accumulate: int) -> float:
    """One epoch; the gradient of each group of `accumulate` batches is averaged, then one step."""
    model.train()
    device = accelerator.device

    def loss_of(_: int, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return loss_fn(model(batch[0].to(device)).float(), batch[1].to(device))

    total = sum(accumulation_step(accelerator, model, optimizer, batches[start:start + accumulate], loss_of)
                for start in range(0, len(batches), accumulate))
    return total / max(1, len(batches))


class ModelSelection:
    """Selection on validation balanced accuracy (ties: lower loss), early stopping after `patience` epochs
    without a better one (no validation part: the last epoch); checkpointable, so a resumed run selects alike."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_key: tuple | None = None
        self.best_state: dict[str, torch.Tensor] | None = None
        self.stale = 0
        self.history: list[dict] = []

    def update(self, entry: dict, val_y: np.ndarray, val_probs: np.ndarray | None,
               state: Callable[[], dict[str, torch.Tensor]]) -> bool:
        """Record an epoch's `entry` (adding the validation metrics), keep state() when it is the best
        so far; True when training should stop."""
        if val_probs is not None and len(val_y):
            entry["val_balanced_accuracy"] = float(balanced_accuracy_score(val_y, val_probs.argmax(1)))
            entry["val_loss"] = float(-np.mean(np.log(val_probs[np.arange(len(val_y)), val_y] + 1e-12)))
            key = selection_key(entry)
        else:
            key = (entry["epoch"],)  # no validation part: the last epoch is kept
        self.history.append(entry)
        if self.best_key is None or key > self.best_key:
            self.best_key, self.stale, self.best_state = key, 0, state()
        else:
            self.stale += 1
        return self.stopped

    @property
    def stopped(self) -> bool:
        """`patience` epochs (at least one) without a better model."""
        return self.stale > 0 and self.stale >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best_key": self.best_key, "best_state": self.best_state, "stale": self.stale, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_key = tuple(state["best_key"]) if state["best_key"] is not None else None
        self.best_state, self.stale, self.history = state["best_state"], state["stale"], list(state["history"])


def _subsample(bags: list[SlideBag], fraction: float, seed: int) -> list[SlideBag]:
    """A stratified `fraction` of the training slides (for learning curves); all when fraction is 1."""
    if fraction >= 1.0:
        return bags
    labels = [bag.label for bag in bags]
    keep, _ = train_test_split(list(range(len(bags))), train_size=fraction, stratify=labels, random_state=seed)
    return [bags[i] for i in sorted(keep)]


def _make_dominant(bags: list[SlideBag], dominant: str | None, ratio: float, seed: int) -> list[SlideBag]:
    """Keep every slide of `dominant` and at most 1/ratio as many of each other class (seeded draw)."""
    if dominant is None:
        return bags
    cap = max(1, round(sum(bag.label == dominant for bag in bags) / ratio))
    rng = np.random.default_rng(seed)
    keep = set()
    for label in {bag.label for bag in bags}:
        members = [i for i, bag in enumerate(bags) if bag.label == label]
        keep.update(members if label == dominant or len(members) <= cap else rng.choice(members, cap, replace=False))
    return [bags[i] for i in sorted(keep)]


def training_slides(bags: list[SlideBag], data: SlideData, seed: int) -> list[SlideBag]:
    """A fold's training slides after the data settings (`train_fraction`, `dominant_class`)."""
    bags = _make_dominant(bags, data.dominant_class, data.dominant_ratio, seed)
    return _subsample(bags, data.train_fraction, seed)


def run_fold(accelerator: Accelerator, fold: Fold, bags: dict[str, SlideBag], classes: list[str],
             settings: SlideSettings, fold_dir: Path) -> tuple[nn.Module, list[dict]]:
    """Train on fold.train, select on fold.val (balanced accuracy, then loss), return the best model."""
    seed = settings.seed + fold.seed_offset
    set_seed(seed)
    train = training_slides([bags[s] for s in fold.train], settings.data, seed)
    val = [bags[s] for s in fold.val]
    dim = train[0].features.shape[1]
    model = build_slide_model(settings.model, len(classes), dim)
    optim = settings.optim
    optimizer = torch.optim.Adam(param_groups(model, optim), lr=optim.lr, weight_decay=optim.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    units = TrainingUnits(train, classes, isinstance(accelerator.unwrap_model(model), RegionFC), optim.batch_regions)
    labels = units.labels.tolist()
    weights = class_weights(labels, len(classes)) if settings.imbalance == "weighted_loss" else None
    loss_fn = WeightedCrossEntropy(weights).to(accelerator.device)
    val_y = np.array([classes.index(bag.label) for bag in val])
    selection = ModelSelection(settings.patience)
    bar = progress(range(optim.epochs), desc=fold.name, disable=not accelerator.is_main_process)
    for epoch in bar:
        order = epoch_order(labels, len(classes), balanced=settings.imbalance == "balanced_sampling",
                            seed=seed, epoch=epoch, rank=accelerator.process_index,
                            world_size=accelerator.num_processes)
        entry = {"epoch": epoch, "train_loss": train_epoch(accelerator, model, optimizer, loss_fn,
                                                            units.batches(order), optim.accumulate)}
        probs = predict(accelerator.unwrap_model(model), val, settings.vote) if val else None
        stop = selection.update(entry, val_y, probs,
                                lambda: copy.deepcopy(accelerator.unwrap_model(model).state_dict()))
        track(accelerator, {k: v for k, v in entry.items() if k != "epoch"}, epoch, f"{fold.name}/epoch/")
        bar.set_postfix({k: round(v, 3) for k, v in entry.items() if k != "epoch"})
        if stop:
            log.info("%s: early stop after epoch %d (best %s)", fold.name, epoch, selection.best_key)
            break
    final = accelerator.unwrap_model(model)
    final.load_state_dict(selection.best_state)
    if accelerator.is_main_process:
        export_safetensors(final, fold_dir / "best_model.safetensors")
        atomic_write_json(fold_dir / "history.json", selection.history)
    return final, selection.history


def slide_model_card(settings: SlideSettings, classes: list[str], dim: int, fold: Fold, test_metrics: dict,
                     slide_encoder_base: dict[str, str] | None = None) -> dict[str, Any]:
    """A staged fold model's card: its own architecture, under "stages" the encoders of its bags, the
    geometry they were embedded at and their lineage; a fine-tuned slide encoder's the authors' file it began from."""
    shards, fc = settings.data.shards, settings.model.name == "fc"
    stages = embedding_stages(shards) if shards else None
    pixels = {key: stages.pop(key) for key in ("normalisation", "tile_px", "region_px", "mpp")} if stages else {}
    return {"kind": "slide_model", "source": f"train_{'fc' if fc else 'wsi'}",
            "architecture": {"slide": settings.model.architecture(dim)}, "classes": classes,
            "head": "fc" if fc else "slide", "vote": settings.vote, "stages": stages,
            **pixels, "lineage": read_lineage(shards).as_dict() if shards else None,
            **({"slide_encoder_base": slide_encoder_base} if slide_encoder_base else {}),
            "fold": {"repeat": fold.repeat, "index": fold.index}, "test_metrics": test_metrics}


def cross_validate(bags: Sequence[SlideBag], classes: Sequence[str], settings: SlideSettings,
                   accelerator: Accelerator | None = None) -> dict:
    """Run every fold on in-memory bags (run_folds; settings.level=patient: a bag per patient), then write
    config.yaml (the whole `settings`, a recipe's own keys included), splits.csv, predictions.csv, metrics.json,
    plots and report.md."""
    accelerator = accelerator or make_accelerator(settings.mixed_precision,
                                                 **tracker_settings(settings.train.log_with, settings.out))
    bags = unit_bags(bags, settings.level, settings.data.shards or "the bags")
    by_id = {bag.slide_id: bag for bag in bags}

    def test_probs(fold: Fold, fold_dir: Path) -> np.ndarray:
        model, _ = run_fold(accelerator, fold, by_id, list(classes), settings, fold_dir)
        test = [by_id[s] for s in fold.test]
        probs = predict(model, test, settings.vote)
        if accelerator.is_main_process:
            metrics = classification_metrics([classes.index(bag.label) for bag in test], probs, classes)
            write_card(fold_dir / "best_model.safetensors",
                       slide_model_card(settings, list(classes), test[0].features.shape[1], fold, metrics,
                                        getattr(model, "base", None)))
        return probs

    data, name = settings.data, settings.model.slide_encoder or settings.model.name
    inputs = "tiles, fine-tuned" if settings.model.slide_encoder else "region embeddings"
    extra = {"title": f"{name} on {inputs}", "model": name, "train_fraction": data.train_fraction,
             "dominant_class": data.dominant_class, "dominant_ratio": data.dominant_ratio}
    start_tracking(accelerator, "slide", settings.to_mapping())
    try:
        return run_folds([bag.info for bag in bags], classes, settings, accelerator, test_probs, extra)
    finally:
        stop_tracking(accelerator)


def train_from_shards(kind: type[SlideSettings], description: str | None, argv: Sequence[str] | None = None) -> dict:
    """The body of train_wsi.py / train_fc.py: settings -> slide-embedding bags -> cross-validation."""
    settings = recipe_settings(kind, description, argv, required=("out", "data.shards"))
    name, data = settings.model.slide_encoder, settings.data
    if name and not settings.model.weights:
        raise SettingError(f"model.slide_encoder={name} needs model.weights: its authors' file")
    if name and settings.level == "patient" and slide_encoder_entry(name).needs_coords:
        raise SettingError(f"model.slide_encoder={name} reads tile coordinates, which a patient's slides share "
                           "(one bag would put their tiles on each other): use level=slide")
    bags, classes = (slide_encoder_bags(data.shards, slide_encoder_entry(name), data.min_tile_tissue) if name
                     else read_slide_bags(data.shards))
    return cross_validate(bags, classes, settings)
