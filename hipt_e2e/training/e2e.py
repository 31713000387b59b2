"""End-to-end fine-tuning of the nested HIPT: raw region pixels from shards -> slide label.

One micro-step is one slide: k sampled regions (augmented when `augment.enabled`) through tile encoder ->
ViT4K -> slide model, with gradients into every stage not frozen; memory bounded by checkpointing chunks of
tiles (and optionally blocks), mixed precision and accumulation over slides. Evaluation scores every region
(hipt_e2e.inference.scoring). Splits, selection and the report are slide-level training's (training.folds).
Every random draw is a function of (seed, fold, epoch, step, place in the global batch), so `resume=true`
continues exactly and k processes x a slides equal one process accumulating k*a.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from itertools import groupby
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.utils.data import DataLoader
from tqdm import tqdm

from hipt_e2e.config import Settings, bound, section
from hipt_e2e.data.augment import AugmentSettings, Tta, augment_regions, tta_poses
from hipt_e2e.data.regions import ShardRegions
from hipt_e2e.data.samples import decode_mode, device_pixels
from hipt_e2e.data.storage import StorageSettings
from hipt_e2e.errors import SettingError
from hipt_e2e.evaluation.metrics import classification_metrics
from hipt_e2e.evaluation.splits import Fold
from hipt_e2e.inference.scoring import UPRIGHT, Pose, score_slide
from hipt_e2e.io import atomic_write_json
from hipt_e2e.lineage import check_weights, read_lineage
from hipt_e2e.models import HIPT, TileViT, model_preset, select_attention
from hipt_e2e.models.bundle import (
    hipt_from,
    region_architecture,
    tile_architecture,
    tile_normalisation,
    tile_width,
    trained_keys,
    write_card,
)
from hipt_e2e.models.encoders import RegionModel, TileModel
from hipt_e2e.models.foundation import load_stage_weights, require_weights
from hipt_e2e.models.hipt import STAGES
from hipt_e2e.progress import progress
from hipt_e2e.runtime import Precision, make_accelerator
from hipt_e2e.training.checkpointing import (
    CHECKPOINT,
    TRAIN_LOG,
    NonFiniteLossError,
    export_safetensors,
    keep_log_before,
    resume_state,
    save_checkpoint,
)
from hipt_e2e.training.data import derived_seed
from hipt_e2e.training.folds import FoldSettings, run_folds
from hipt_e2e.training.slide_level import (
    ModelSelection,
    WeightedCrossEntropy,
    accumulation_step,
    class_weights,
    epoch_order,
)
from hipt_e2e.training.tracking import LogWith, start_tracking, stop_tracking, track, tracker_settings

log = logging.getLogger(__name__)

BEST_MODEL = "best_model.safetensors"
AUGMENT_STREAM = 1  # appended to a step's seed key: augmentation draws apart from dropout's

# The defaults are the demo's (recipes/e2e.py: synthetic slides), the tiny preset from random weights, CPU-sized.
# A tiny HIPT from random weights sits on a plateau (constant predictions) for some 300-600 steps before
# it separates the demo's classes (measured: 14-18 of these epochs); dropout, weight decay or a lower
# learning rate stretch that, so the demo trains without them, long enough, and never stops early.
# Real shards take recipes/configs/e2e.yaml (HIPT's geometry and fine-tuning settings) on top of these.
@dataclass(frozen=True)
class E2EData(StorageSettings):
    """The `data` section: the region shards and how they are read."""

    shards: str | None = None  # region shards (hipt-shards build): a folder or URL (file://, http(s)://, s3://, gs://)
    # k regions sampled per slide per training step (all when fewer; null: all); level=patient: per patient bag
    regions_per_slide: int | None = bound(8, 1)
    min_tile_tissue: float = bound(0.0, 0.0, 1.0)  # skip tiles with a smaller tissue fraction (zero embedding); 0: none
    workers: int = bound(0, 0)  # DataLoader workers per process (decoding overlaps compute)
    decode: Literal["cpu", "gpu"] = "cpu"  # cpu: readers decode JPEG regions | gpu: decoded on the CUDA device in one batch per step
    cache_dir: str | None = None  # remote shards: keep the regions read in this local folder (shared by processes)
    cache_gb: float = bound(50.0, 0.0)  # at most this much in cache_dir (the oldest entries go first)


@dataclass(frozen=True)
class StageWeights(Settings):
    """model.weights: each stage's initial weights (safetensors / state dict / DINO checkpoint); null: random."""

    tile: str | None = None
    region: str | None = None
    slide: str | None = None


@dataclass(frozen=True)
class Lora(Settings):
    """model.lora: low-rank adapters on a pretrained tile encoder's attention qkv (rank 0: none)."""

    rank: int = bound(0, 0)
    alpha: float | None = None  # null: = rank (scale 1)


@dataclass(frozen=True)
class E2EModel(RegionModel, TileModel):
    """The `model` section: the tile and region encoders (TileModel, RegionModel), the slide model, their
    initial weights and what trains."""

    preset: str = "tiny"
    normalisation: str = "hipt"  # as the tile encoder was pretrained (the DINO recipe here uses imagenet)
    dropout: float = bound(0.0, 0.0, 1.0)  # slide model
    drop_path_rate: float = bound(0.0, 0.0, 1.0)  # tile encoder stochastic depth
    weights: StageWeights = section(StageWeights)
    trusted: bool = False  # allow unpickling released checkpoints (only files you trust)
    freeze_tile: bool = False  # true: the staged features, computed on the fly
    # pretrained tile encoders (model.encoder=uni_v1, ...) when not frozen: all | k (the last k blocks and
    # the final norm) | lora (with lora.rank > 0: adapters on attention qkv, the base frozen)
    tile_trainable: Literal["all", "lora"] | int = "all"
    lora: Lora = section(Lora)
    freeze_region: bool = False  # with freeze_tile: only the slide model trains


@dataclass(frozen=True)
class Memory(Settings):
    chunk_size: int = bound(256, 1)  # tiles per tile-encoder call
    checkpoint_chunks: bool = True  # keep only chunk outputs; recompute each chunk in backward
    checkpoint_blocks: bool = False  # also recompute every ViT block (tile and region encoders)
    eval_regions: int = bound(16, 1)  # regions per no-grad call in validation and test


@dataclass(frozen=True)
class StageRates(Settings):
    """optim.lr: each stage's learning rate."""

    tile: float = bound(5.0e-4, 0.0)
    region: float = bound(5.0e-4, 0.0)
    slide: float = bound(5.0e-4, 0.0)


@dataclass(frozen=True)
class E2EOptim(Settings):
    """The `optim` section: AdamW, one learning rate per stage."""

    lr: StageRates = section(StageRates)
    layer_decay: float = bound(0.9, 0.0)  # tile ViT: block i gets lr * layer_decay^(depth - i)
    weight_decay: float = bound(0.0, 0.0)  # weights only (not biases, norms)
    warmup_steps: int = bound(0, 0)  # linear warm-up of every learning rate, in optimizer steps per fold
    clip_grad: float = bound(0.3, 0.0)  # global gradient norm; 0 = off


@dataclass(frozen=True)
class E2ETrain(Settings):
    epochs: int = bound(30, 1)
    grad_accum: int = bound(1, 1)  # slides per process per optimizer step
    # slides whose regions share one tile-encoder / ViT4K call (divides grad_accum): fills the batch when
    # slides are small; 1 keeps every random draw per slide, so k processes equal one accumulating exactly
    slides_per_call: int = bound(1, 1)
    mixed_precision: Precision = None  # no | bf16 | fp16; null: as `accelerate launch` says
    fsdp: bool = False  # shard parameters, gradients and optimizer state instead of replicating (DDP)
    threads: int | None = bound(1, 1)  # torch CPU threads per process; null: torch's default (tiny models run best on one)
    checkpoint_every: int = bound(50, 1)  # optimizer steps (and at the end of every epoch)
    stop_after: int | None = bound(None, 0)  # end this run after this many optimizer steps over all folds (resume=true continues)
    log_every: int = bound(10, 1)
    log_with: LogWith = "none"  # none | tensorboard | mlflow | wandb, one run, tags per fold


@dataclass(frozen=True)
class E2ESettings(FoldSettings):
    """End-to-end training's settings (recipes/e2e.py adds its demo): the cross-validation (FoldSettings:
    out, seed, folds, cv.repeats, imbalance, patience) and the sections below."""

    folds: int = 3
    patience: int = bound(30, 0)  # epochs without a better validation balanced accuracy before a fold stops
    resume: bool = False
    tta: Tta = "none"  # none | dihedral: validation and test slides scored in the 8 poses of their regions, averaged
    data: E2EData = section(E2EData)
    model: E2EModel = section(E2EModel)
    memory: Memory = section(Memory)
    optim: E2EOptim = section(E2EOptim)
    train: E2ETrain = section(E2ETrain)
    augment: AugmentSettings = section(AugmentSettings)  # training regions only (hipt_e2e.data.augment); off in the demo


class TrainingStopped(Exception):
    """train.stop_after was reached; the checkpoint is saved and resume=true continues the run."""


def _loader(regions: ShardRegions, keys: Sequence[tuple[str, tuple[int, ...]]], workers: int,
            device: torch.device) -> DataLoader:
    """Items in the order of `keys`; workers decode ahead while the model computes."""
    return DataLoader(regions, sampler=keys, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda")


def tile_mask(tissue: torch.Tensor, min_tissue: float) -> torch.Tensor | None:
    """True for tiles whose tissue fraction is below min_tissue (not encoded, zero embedding). None when
    nothing would be skipped, or everything would (then every tile is encoded rather than none)."""
    if min_tissue <= 0:
        return None
    mask = tissue < min_tissue
    return mask if mask.any() and not mask.all() else None


def architecture(model: E2EModel) -> dict[str, Any]:
    """The resolved architecture of a model section (hipt_e2e.models.bundle), as the model cards record it."""
    tile = tile_architecture(model, model.tile_trainable, model.lora.rank, model.lora.alpha)
    region = region_architecture(model)
    if "entry" in tile and model.region.in_dim is None:
        region["in_dim"] = tile_width(tile)  # ViT4K takes the pretrained encoder's width
    # the slide model takes the region encoder's width, as train_wsi.py takes the bags' width
    slide = {"name": "vit_wsi", **model_preset(model.preset)["slide"], "dim": region["embed_dim"],
             "dropout": model.dropout}
    return {"tile": tile, "region": region, "slide": slide}


def build_model(settings: E2ESettings, n_classes: int, tile_px: int | None = None) -> HIPT:
    """The nested HIPT of settings.model with settings.memory and any initial weights loaded, for tiles of
    tile_px (the shards'; None: the preset's)."""
    model_settings, memory = settings.model, settings.memory
    tile_px = tile_px or model_preset(model_settings.preset)["tile_px"]
    arch = architecture(model_settings)
    model = hipt_from(arch, n_classes, drop_path_rate=model_settings.drop_path_rate, tile_px=tile_px,
                      normalisation=tile_normalisation(arch["tile"], model_settings.normalisation),
                      chunk_size=memory.chunk_size, freeze_tile=model_settings.freeze_tile,
                      freeze_region=model_settings.freeze_region, checkpoint_chunks=memory.checkpoint_chunks,
                      checkpoint_blocks=memory.checkpoint_blocks)
    tile_encoder, region_encoder = model.tile_encoder, model.region_encoder
    if isinstance(tile_encoder, TileViT) and tile_px % tile_encoder.patch_size:
        raise SettingError(f"{tile_px} px tiles do not split into the tile ViT's {tile_encoder.patch_size} px patches")
    if region_encoder.in_dim != tile_encoder.num_features:
        raise SettingError(f"the tile encoder gives {tile_encoder.num_features}-d embeddings but ViT4K takes "
                         f"{region_encoder.in_dim}: set model.region.in_dim={tile_encoder.num_features}")
    require_weights(tile_encoder, model_settings.weights.tile, "model.weights.tile")
    weights = model_settings.weights.to_mapping()
    for stage, path in weights.items():
        if path is not None:  # every tensor must fit: a wrong file fails here, not as a silent random init
            load_stage_weights(model.stage(stage), path, trusted=model_settings.trusted)
    random = [stage for stage, path in weights.items() if path is None]
    if random:
        log.info("randomly initialised stages: %s", ", ".join(random))
    return model


def _tile_layer(name: str, depth: int) -> int:
    """Layer of a tile-ViT parameter for layer-wise lr decay: embeddings 0, block i -> i + 1, norm depth + 1."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1 if name.startswith("norm.") else 0


def param_groups(model: HIPT, optim: E2EOptim) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: each stage its own learning rate, scaled in a tile ViT
    by layer_decay^(depth + 1 - layer) so layers near the pixels move least (a CNN tile encoder takes
    its stage's rate throughout); weight decay on weights (ndim > 1), none on biases and norms."""
    groups: dict[tuple, dict[str, Any]] = {}
    for stage in STAGES:
        module = model.stage(stage)
        depth = len(module.blocks) if isinstance(module, TileViT) else None
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            scale = optim.layer_decay ** (depth + 1 - _tile_layer(name, depth)) if depth is not None else 1.0
            decay = param.ndim > 1
            lr = getattr(optim.lr, stage) * scale
            group = groups.setdefault((stage, lr, decay), {
                "params": [], "stage": stage, "lr": lr, "base_lr": lr,
                "weight_decay": optim.weight_decay if decay else 0.0})
            group["params"].append(param)
    return list(groups.values())


def scorer_chunks(chunks: Iterable[dict], device: torch.device,
                  min_tile_tissue: float) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
    """Chunks of shard regions (ShardRegions items) as the slide scorer takes them: the pixels on `device`
    and the mask of the tiles below min_tile_tissue (hipt_e2e.inference.scoring.score_slide)."""
    for part in chunks:
        mask = tile_mask(part["tissue"], min_tile_tissue)
        yield device_pixels(part["pixels"], device), mask.to(device) if mask is not None else None


def slide_probabilities(model: HIPT, chunks: Iterable[dict], device: torch.device, min_tile_tissue: float,
                        autocast: Callable[[], AbstractContextManager],
                        poses: Sequence[Pose] = UPRIGHT) -> dict[str, np.ndarray]:
    """Slide id -> class probabilities from chunks of its regions (consecutive items of one slide), by the
    slide scorer: with several poses (test-time augmentation) once per pose, the probabilities averaged."""
    return {slide_id: score_slide([(model, None)], scorer_chunks(parts, device, min_tile_tissue), poses, autocast).probs
            for slide_id, parts in groupby(chunks, key=lambda item: item["slide_id"])}


class FoldTrainer:
    """Train one fold on fold.train, select on fold.val, predict fold.test; resumable at any checkpoint.
    Validation and test run on a plain copy of the (DDP / FSDP wrapped) model, split by slide."""

    def __init__(self, accelerator: Accelerator, settings: E2ESettings, regions: ShardRegions,
                 classes: Sequence[str], fold: Fold, fold_dir: Path, run_steps: int) -> None:
        self.accelerator, self.settings, self.regions, self.fold, self.dir = accelerator, settings, regions, fold, fold_dir
        self.device, self.rank, self.world = accelerator.device, accelerator.process_index, accelerator.num_processes
        self.main = accelerator.is_main_process
        self.classes = list(classes)
        self.labels = labels = {info.slide_id: classes.index(info.label) for info in regions.infos()
                                if info.label is not None}
        self.train_ids = list(fold.train)
        self.train_labels = [labels[s] for s in self.train_ids]
        self.val_y = np.array([labels[s] for s in fold.val])
        self.n_classes = len(classes)
        self.seed = settings.seed + fold.seed_offset
        self.checkpoint_path = fold_dir / CHECKPOINT

        torch.manual_seed(self.seed)  # the same initial weights on every process
        self.lineage = read_lineage(regions.manifest)  # the training data's, for the card
        self.tile_px = self.lineage.geometry.tile_px
        model = select_attention(build_model(settings, self.n_classes, self.tile_px), self.device,
                                 accelerator.mixed_precision)
        self.eval_model = copy.deepcopy(model).to(self.device).eval()
        # what training changes: checkpoints, the selected state and the export hold only these (all keys
        # but a pretrained tile encoder's frozen base, which build_model loaded from its file)
        self.trained = trained_keys(self.eval_model, settings.model.freeze_tile)
        optimizer = torch.optim.AdamW(param_groups(model, settings.optim))
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        weights = class_weights(self.train_labels, self.n_classes) if settings.imbalance == "weighted_loss" else None
        self.loss_fn = WeightedCrossEntropy(weights).to(self.device)

        per_process = math.ceil(len(self.train_ids) / self.world)  # epoch_order pads to this
        self.steps_per_epoch = math.ceil(per_process / settings.train.grad_accum)
        self.selection = ModelSelection(settings.patience)
        self.epoch, self.step, self.steps, self.run_steps = 0, 0, 0, run_steps
        self.epoch_losses: list[float] = []
        self.test_probs: np.ndarray | None = None
        state = resume_state(settings, self.checkpoint_path)
        if state is not None:
            self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        missing = set(self.trained) - set(state["model"])
        if missing:
            raise ValueError(f"{self.checkpoint_path} lacks trained tensors, e.g. {sorted(missing)[:3]}")
        # strict=False: the frozen base is not in the checkpoint (it came from its file); the rest is checked above
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(full_state_dict=True, strict=False))
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.selection.load_state_dict(state["selection"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.steps, self.run_steps = state["steps"], state["run_steps"]
        self.epoch_losses = list(state["epoch_losses"])
        self.test_probs = state["test_probs"].numpy() if state["test_probs"] is not None else None
        log.info("%s: resuming %s at epoch %d, step %d", self.fold.name, self.checkpoint_path, self.epoch,
                 self.step)

    def save(self) -> None:
        """Checkpoint (atomically) everything that the rest of this fold depends on."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer,
                                                  options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.main:
            scaler = self.accelerator.scaler
            save_checkpoint(self.checkpoint_path, {
                "model": {key: model_state[key] for key in self.trained}, "optimizer": optim_state,
                "scaler": scaler.state_dict() if scaler is not None else None,
                "selection": self.selection.state_dict(), "epoch": self.epoch, "step": self.step,
                "steps": self.steps, "run_steps": self.run_steps, "epoch_losses": self.epoch_losses,
                "test_probs": torch.from_numpy(self.test_probs) if self.test_probs is not None else None,
                "config": self.settings.to_mapping(),
            })
        self.accelerator.wait_for_everyone()

    def _sync_eval_model(self) -> None:
        """The current full weights into the plain evaluation copy (a collective under FSDP)."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        self.eval_model.load_state_dict(state)

    def predict(self, slide_ids: Sequence[str]) -> np.ndarray:
        """Probabilities [len(slide_ids), K] of the evaluation copy, every region of each slide; the
        slides are split over the processes and the results gathered."""
        mine = list(slide_ids)[self.rank::self.world]
        keys = [key for slide in mine for key in self.regions.chunks(slide, self.settings.memory.eval_regions)]
        loader = _loader(self.regions, keys, self.settings.data.workers, self.device)
        probs = slide_probabilities(self.eval_model, loader, self.device, self.settings.data.min_tile_tissue,
                                    self.accelerator.autocast, tta_poses(self.settings.tta))
        merged = {slide: p for part in gather_object([probs]) for slide, p in part.items()}
        return np.stack([merged[slide] for slide in slide_ids]) if slide_ids else np.zeros((0, self.n_classes))

    def _set_lr(self) -> None:
        warmup = self.settings.optim.warmup_steps
        factor = min(1.0, (self.steps + 1) / warmup) if warmup else 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor

    def _slide_input(self, item: dict, place: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A training slide's regions on the device (augmented when enabled, with draws seeded by its place
        in the global batch) and its tile mask (False everywhere when nothing is skipped)."""
        pixels, tissue = device_pixels(item["pixels"], self.device), item["tissue"]
        if self.settings.augment.enabled:
            key = (self.settings.seed, self.fold.seed_offset, self.epoch, self.step, place, AUGMENT_STREAM)
            pixels, tissue = augment_regions(pixels, tissue, self.settings.augment, self.tile_px,
                                             torch.Generator().manual_seed(derived_seed(*key)))
        mask = tile_mask(tissue, self.settings.data.min_tile_tissue)
        return pixels, (mask if mask is not None else torch.zeros(tissue.shape, dtype=torch.bool))

    def _loss_of(self, n: int, items: list[dict], scale: float) -> torch.Tensor:
        """Micro-batch n of this process's part of the global batch: its slides' regions through the encoders
        together, the slide model per slide; their summed loss times `scale` (micro-batches / slides in the
        step, so accumulation_step's mean over micro-batches is the mean over slides)."""
        per_call = self.settings.train.slides_per_call
        places = [(n * per_call + j) * self.world + self.rank for j in range(len(items))]  # index in the global batch
        torch.manual_seed(derived_seed(self.settings.seed, self.fold.seed_offset, self.epoch, self.step, places[0]))
        pixels, masks = zip(*(self._slide_input(item, place) for item, place in zip(items, places)))
        mask = torch.cat(masks)
        logits = self.model(torch.cat(pixels), mask.to(self.device) if mask.any() else None,
                            bag_sizes=[len(p) for p in pixels])
        target = torch.tensor([item["label_index"] for item in items], device=self.device)
        return self.loss_fn(logits.float(), target) * len(items) * scale

    def train_epoch(self, bar: tqdm) -> None:
        train = self.settings.train
        order = epoch_order(self.train_labels, self.n_classes, balanced=self.settings.imbalance == "balanced_sampling",
                            seed=self.seed, epoch=self.epoch, rank=self.rank, world_size=self.world)
        groups = [order[i:i + train.grad_accum] for i in range(0, len(order), train.grad_accum)]
        keys = [self.regions.sample(self.train_ids[i], self.epoch) for group in groups[self.step:] for i in group]
        items = iter(_loader(self.regions, keys, self.settings.data.workers, self.device))
        self.model.train()
        for step in range(self.step, len(groups)):
            self.step = step  # seeds this step's random draws (_loss_of)
            self._set_lr()
            started = time.perf_counter()
            group = [next(items) for _ in groups[self.step]]
            calls = [group[i:i + train.slides_per_call] for i in range(0, len(group), train.slides_per_call)]
            scale = len(calls) / len(group)
            total = accumulation_step(self.accelerator, self.model, self.optimizer, calls,
                                      partial(self._loss_of, scale=scale), self.settings.optim.clip_grad)
            loss = self.accelerator.reduce(torch.tensor(total / len(calls), device=self.device), "mean").item()
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"{self.fold.name}: loss {loss} at epoch {self.epoch} step {self.step}; nothing was saved "
                    f"after it (last checkpoint: {self.checkpoint_path}). Lower the learning rates or use bf16.")
            self.epoch_losses.append(loss)
            if self.main:  # tiles/s of the global batch: every process trains as many slides per step
                tiles = sum(item["tissue"].numel() for item in group) * self.world
                self._log(loss, tiles / (time.perf_counter() - started))
            self.steps, self.run_steps, self.step = self.steps + 1, self.run_steps + 1, self.step + 1
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", epoch=self.epoch)
            if train.stop_after is not None and self.run_steps >= train.stop_after:
                self.save()
                raise TrainingStopped(f"stopped after {self.run_steps} steps (train.stop_after); "
                                      "continue with resume=true")
            if self.steps % train.checkpoint_every == 0:
                self.save()

    def _log(self, loss: float, tiles_per_s: float) -> None:
        lr: dict[str, float] = {}  # each stage's highest (the top of the tile ViT's layer decay)
        for group in self.optimizer.param_groups:
            lr[group["stage"]] = max(lr.get(group["stage"], 0.0), group["lr"])
        entry = {"step": self.steps, "epoch": self.epoch, "loss": loss, "lr": lr}
        with open(self.dir / TRAIN_LOG, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        track(self.accelerator, {"loss": loss, **{f"lr_{stage}": value for stage, value in lr.items()},
                                 "tiles_per_s": tiles_per_s}, self.steps, f"{self.fold.name}/train/")
        if (self.steps + 1) % self.settings.train.log_every == 0:
            log.info("%s step %d epoch %d loss %.4f", self.fold.name, self.steps + 1, self.epoch, loss)

    def _end_epoch(self) -> None:
        """Validate, update model selection, checkpoint."""
        self._sync_eval_model()
        probs = self.predict(self.fold.val) if self.fold.val else None
        entry = {"epoch": self.epoch, "train_loss": float(np.mean(self.epoch_losses))}
        self.selection.update(entry, self.val_y, probs, self._trained_state)
        track(self.accelerator, {k: v for k, v in entry.items() if k != "epoch"}, self.steps, f"{self.fold.name}/epoch/")
        log.info("%s epoch %d: %s", self.fold.name, self.epoch,
                 ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if k != "epoch"))
        self.epoch, self.step, self.epoch_losses = self.epoch + 1, 0, []
        self.save()

    def _trained_state(self) -> dict[str, torch.Tensor]:
        state = self.eval_model.state_dict()
        return {key: state[key].detach().cpu().clone() for key in self.trained}

    def _card(self) -> dict[str, Any]:
        """What hipt_e2e.models.load_bundle needs to rebuild the selected model, and what it scored."""
        model_settings, geometry = self.settings.model, self.lineage.geometry
        arch = architecture(model_settings)
        test_y = [self.labels[slide] for slide in self.fold.test]
        return {
            "kind": "hipt", "source": "e2e", "architecture": arch, "classes": self.classes,
            "normalisation": tile_normalisation(arch["tile"], model_settings.normalisation), "tile_px": self.tile_px,
            # a pretrained tile encoder's base weights (path, sha256): the run saved only what trained
            "tile_base": getattr(self.eval_model.tile_encoder, "weights", None),
            "region_px": geometry.region_px, "mpp": geometry.mpp, "lineage": self.lineage.as_dict(), "head": "slide",
            "frozen": {"tile": model_settings.freeze_tile, "region": model_settings.freeze_region},
            "initial_weights": {stage: str(Path(path).resolve()) if path else None
                                for stage, path in model_settings.weights.to_mapping().items()},
            "fold": {"repeat": self.fold.repeat, "index": self.fold.index},
            "test_metrics": classification_metrics(test_y, self.test_probs, self.classes) if test_y else None,
        }

    def run(self) -> np.ndarray:
        """Train (or continue) to the end of the fold; returns the selected model's test probabilities."""
        if self.test_probs is not None:  # finished in an earlier run
            return self.test_probs
        if self.main:
            self.dir.mkdir(parents=True, exist_ok=True)
            keep_log_before(self.dir / TRAIN_LOG, self.steps)
        epochs = self.settings.train.epochs
        bar = progress(total=epochs * self.steps_per_epoch, initial=self.epoch * self.steps_per_epoch + self.step,
                       desc=self.fold.name, unit="step", disable=not self.main)
        while self.epoch < epochs and not self.selection.stopped:
            self.train_epoch(bar)
            self._end_epoch()
        bar.close()
        self.eval_model.load_state_dict({**self.eval_model.state_dict(), **self.selection.best_state})
        self.test_probs = self.predict(self.fold.test)
        if self.main:
            export_safetensors(self.eval_model, self.dir / BEST_MODEL, {"source": "e2e", "fold": str(self.fold.index),
                                                                           "repeat": str(self.fold.repeat)},
                               keys=self.trained)
            write_card(self.dir / BEST_MODEL, self._card())
            atomic_write_json(self.dir / "history.json", self.selection.history)
        self.save()
        return self.test_probs


def e2e_accelerator(settings: E2ESettings) -> Accelerator:
    """The Accelerator of an end-to-end run as configured (precision, FSDP, trackers)."""
    train = settings.train
    return make_accelerator(train.mixed_precision, fsdp=train.fsdp, **tracker_settings(train.log_with, settings.out))


def train_e2e(settings: E2ESettings, accelerator: Accelerator | None = None) -> dict[str, Any] | None:
    """Cross-validated end-to-end fine-tuning: writes what slide-level training writes plus fold_i/checkpoint.pt
    and train_log.jsonl; returns the metrics (with "report"), or None when stopped by train.stop_after.
    accelerator: the run's (e2e_accelerator), built here when not given."""
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.train.threads or threads)
    try:
        return _train_e2e(settings, accelerator)
    finally:
        torch.set_num_threads(threads)  # a process-wide setting: leave it as found


def _run_description(settings: E2ESettings, accelerator: Accelerator) -> dict[str, Any]:
    """What the report and metrics.json say of the run beyond the fold loop's settings."""
    model, augment = settings.model, settings.augment
    mode = {(False, False): "end to end", (True, False): "frozen tile encoder",
            (True, True): "frozen tile encoder and ViT4K"}.get((model.freeze_tile, model.freeze_region),
                                                              "frozen ViT4K, trained tile encoder")
    return {"title": f"HIPT fine-tuned {mode} from region pixels", "mode": mode, "preset": model.preset,
            "tile_encoder": model.encoder, "initial_weights": model.weights.to_mapping(),
            "regions_per_slide": settings.data.regions_per_slide, "grad_accum": settings.train.grad_accum,
            "augment": {k: v for k, v in augment.to_mapping().items() if k != "enabled"} if augment.enabled else "off",
            "mixed_precision": accelerator.mixed_precision}


def _train_e2e(settings: E2ESettings, accelerator: Accelerator | None) -> dict[str, Any] | None:
    train, data = settings.train, settings.data
    if train.grad_accum % train.slides_per_call:
        raise SettingError(f"train.slides_per_call={train.slides_per_call} must divide "
                           f"train.grad_accum={train.grad_accum}")
    if data.shards is None or settings.out is None:
        raise SettingError("set data.shards=SHARDS (a folder or URL of region shards) and out=DIR")
    accelerator = accelerator or e2e_accelerator(settings)
    regions = ShardRegions(data.shards, regions_per_slide=data.regions_per_slide, seed=settings.seed,
                           decode=decode_mode(data.decode, accelerator.device), cache_dir=data.cache_dir,
                           cache_bytes=int(data.cache_gb * 2**30), level=settings.level)
    classes = regions.manifest["classes"]
    geometry = read_lineage(regions.manifest).geometry
    # weights from a run with a card: its geometry
    check_weights(settings.model.weights.to_mapping(), geometry, data.shards)
    log.info("global batch %d slides = %d per process x %d processes, %s regions per slide of %d px tiles "
             "(model.preset %s); %s precision; parallelism %s; JPEG decoded on the %s",
             train.grad_accum * accelerator.num_processes, train.grad_accum, accelerator.num_processes,
             data.regions_per_slide or "all", geometry.tile_px, settings.model.preset,
             accelerator.mixed_precision, accelerator.distributed_type.value, regions.decoder.decode)
    run_steps = 0

    def test_probs(fold: Fold, fold_dir: Path) -> np.ndarray:
        nonlocal run_steps
        trainer = FoldTrainer(accelerator, settings, regions, classes, fold, fold_dir, run_steps)
        probs = trainer.run()
        run_steps = trainer.run_steps
        return probs

    start_tracking(accelerator, "e2e", settings.to_mapping())
    try:
        metrics = run_folds(regions.infos(), classes, settings, accelerator, test_probs,
                            _run_description(settings, accelerator))
    except TrainingStopped as stopped:
        log.info("%s", stopped)
        return None
    finally:
        stop_tracking(accelerator)
    return {**metrics, "report": str(Path(settings.out) / "report.md")}
