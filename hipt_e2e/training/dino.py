"""The DINO training engine behind both pretraining recipes: tiles -> ViT256 (or a CNN), token grids -> ViT4K.

A step, as in DINO: scheduled lr, weight decay and teacher momentum; multi-crop; the loss against the
centred, sharpened teacher; per-parameter clipping; the prototype layer frozen in the first epoch(s); the
teacher EMA. Random draws are re-seeded every step from (seed, step, place in the global batch) and the
checkpoint records each process's place in its stream, so `resume=true` repeats the uninterrupted run.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.utils.data import IterableDataset

from hipt_e2e.config import Settings, bound, save_config, section
from hipt_e2e.data.storage import StorageSettings
from hipt_e2e.errors import SettingError
from hipt_e2e.models import select_attention
from hipt_e2e.models.bundle import write_card
from hipt_e2e.models.encoders import BACKBONE_EXPORT, RegionModel, TileModel
from hipt_e2e.progress import progress
from hipt_e2e.runtime import Precision, make_accelerator
from hipt_e2e.ssl import (
    DINOHead,
    DINOLoss,
    MultiCropWrapper,
    cancel_last_layer_gradients,
    clip_gradients_per_parameter,
    cosine_schedule,
    scaled_lr,
    set_lr_and_weight_decay,
    update_teacher,
    weight_decay_groups,
)
from hipt_e2e.training.checkpointing import (
    CHECKPOINT,
    TRAIN_LOG,
    NonFiniteLossError,
    export_safetensors,
    keep_log_before,
    resume_state,
    save_checkpoint,
)
from hipt_e2e.training.data import EpochBatches, derived_seed
from hipt_e2e.training.tracking import LogWith, start_tracking, stop_tracking, track, tracker_settings

log = logging.getLogger(__name__)

AUGMENT, DROP_PATH = 0, 1  # which random stream a derived seed feeds


@dataclass(frozen=True)
class DINOObjective(Settings):
    """The `dino` section: the projection heads, the loss and the teacher."""

    out_dim: int = bound(65536, 1)
    hidden_dim: int = bound(2048, 1)
    bottleneck_dim: int = bound(256, 1)
    norm_last_layer: bool = True
    warmup_teacher_temp: float = bound(0.04, 0.0)
    teacher_temp: float = bound(0.04, 0.0)
    warmup_teacher_temp_epochs: int = bound(0, 0)
    momentum_teacher: float = bound(0.996, 0.0, 1.0)
    freeze_last_layer: int = bound(1, 0)  # epochs
    drop_path_rate: float = bound(0.1, 0.0, 1.0)  # student only


@dataclass(frozen=True)
class DINOOptim(Settings):
    # adamw (DINO's ViT recipe) | sgd (momentum 0.9: DINO's ResNet-50 recipe, with lr 0.03 and a constant
    # weight decay of 1e-4 at weight_decay = weight_decay_end)
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = bound(0.0005, 0.0)  # for a global batch of 256, scaled linearly
    min_lr: float = bound(1.0e-6, 0.0)
    warmup_epochs: int = bound(10, 0)
    weight_decay: float = bound(0.04, 0.0)
    weight_decay_end: float = bound(0.4, 0.0)
    clip_grad: float = bound(3.0, 0.0)  # per parameter; 0 = off


@dataclass(frozen=True)
class DINOTrain(Settings):
    epochs: int = bound(100, 1)
    steps_per_epoch: int | None = bound(None, 0)  # null: one pass over the data at the global batch size
    batch_size: int = bound(64, 1)  # per process and micro-batch
    grad_accum: int = bound(1, 1)
    mixed_precision: Precision = None  # no | bf16 | fp16; null: as `accelerate launch` says
    augment_chunk: int | None = bound(None, 0)  # samples per crop-sampling call; null: the whole micro-batch
    checkpoint_every: int = bound(1000, 1)  # steps
    stop_after: int | None = bound(None, 0)  # end this run after this many steps in total (resume=true continues)
    log_every: int = bound(50, 1)
    log_with: LogWith = "none"  # none | tensorboard | mlflow | wandb (hipt_e2e.training.tracking)


@dataclass(frozen=True)
class DINOData(StorageSettings):
    """The `data` section: token-grid shards (an embed_tiles output) for the region level."""

    shards: str | tuple[str, ...] | None = None  # a shard set (folder or URL), or a list of shard files
    shuffle: int = bound(1000, 0)  # samples (regions) in the shuffle buffer
    workers: int = bound(4, 0)  # DataLoader workers per process


@dataclass(frozen=True)
class TileData(DINOData):
    """The `data` section of DINO on tiles: region or tile shards (hipt-shards build)."""

    shuffle: int = bound(10000, 0)  # tiles in the shuffle buffer
    min_tissue: float = bound(0.25, 0.0, 1.0)  # skip tiles with less tissue
    normalisation: str = "imagenet"  # what the original tile-level DINO used; recorded with the weights


@dataclass(frozen=True)
class Crops(Settings):
    """The `crops` section: 2 global and n_local local crops (token crops of a grid at the region level)."""

    global_size: int = bound(14, 1)
    local_size: int = bound(6, 1)
    n_local: int = bound(8, 0)


@dataclass(frozen=True)
class TileCrops(Crops):
    """The tile level's crops, in pixels, with the fractions of the tile each may cover."""

    global_size: int = bound(224, 1)
    local_size: int = bound(96, 1)
    global_scale: tuple[float, ...] = (0.4, 1.0)
    local_scale: tuple[float, ...] = (0.05, 0.4)


@dataclass(frozen=True)
class DINOSettings(Settings):
    """The settings both pretraining recipes share; each adds its `model` (and its own data and crops)."""

    out: str | None = None
    seed: int = 0
    resume: bool = False
    dino: DINOObjective = section(DINOObjective)
    optim: DINOOptim = section(DINOOptim)
    train: DINOTrain = section(DINOTrain)
    data: DINOData = section(DINOData)
    crops: Crops = section(Crops)


@dataclass(frozen=True)
class TilePretraining(DINOSettings):
    """recipes/pretrain_vit256.py: DINO on tiles (ViT256, or a CNN with model.encoder=cnn)."""

    data: TileData = section(TileData)
    crops: TileCrops = section(TileCrops)
    model: TileModel = section(TileModel)


@dataclass(frozen=True)
class RegionPretraining(DINOSettings):
    """recipes/pretrain_vit4k.py: DINO on token grids (ViT4K)."""

    model: RegionModel = section(RegionModel)


def _student_and_teacher(backbone: Callable[[float], nn.Module], dino: DINOObjective
                         ) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    def network(drop_path_rate: float) -> MultiCropWrapper:
        encoder = backbone(drop_path_rate)
        head = DINOHead(encoder.num_features, dino.out_dim, dino.hidden_dim, dino.bottleneck_dim,
                        norm_last_layer=dino.norm_last_layer)
        return MultiCropWrapper(encoder, head)

    student, teacher = network(dino.drop_path_rate), network(0.0)
    teacher.load_state_dict(student.state_dict())  # the teacher starts as the student and only follows by EMA
    teacher.requires_grad_(False).eval()
    return student, teacher


def make_crops(multicrop: Callable[..., list[torch.Tensor]], inputs: torch.Tensor, seed: int, step: int,
               place: int, chunk: int | None) -> list[torch.Tensor]:
    """The crops of one micro-batch, each chunk from a generator seeded by (seed, step, global chunk index), so
    a sample's crops do not depend on how the global batch is split over processes and micro-batches."""
    chunk = chunk or len(inputs)
    parts = inputs.split(chunk)
    views = [multicrop(part, torch.Generator().manual_seed(derived_seed(seed, step, place * len(parts) + c, AUGMENT)))
             for c, part in enumerate(parts)]
    return [torch.cat(crop) for crop in zip(*views)]


def dino_optimizer(name: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer of optim.name; its lr and weight decay are set every step by the schedules."""
    return torch.optim.AdamW(groups) if name == "adamw" else torch.optim.SGD(groups, lr=0.0, momentum=0.9)


class DINOTrainer:
    """One DINO run, set up (or restored) on construction. backbone(drop_path_rate) builds a fresh encoder;
    stream yields {"pixels", ...} items and has set_epoch; multicrop(batch, generator) returns the crops."""

    def __init__(self, settings: DINOSettings, backbone: Callable[[float], nn.Module], stream: IterableDataset,
                 multicrop: Callable[..., list[torch.Tensor]], samples_per_epoch: int,
                 card: Mapping[str, Any] | None = None) -> None:
        self.settings, self.multicrop, self.card = settings, multicrop, card
        train, optim, dino = settings.train, settings.optim, settings.dino
        self.out = Path(settings.out)
        self.checkpoint_path = self.out / CHECKPOINT
        self.accelerator = accelerator = make_accelerator(train.mixed_precision,
                                                          gradient_accumulation_steps=train.grad_accum,
                                                          **tracker_settings(train.log_with, self.out))
        self.device, self.world, self.rank = accelerator.device, accelerator.num_processes, accelerator.process_index
        self.main = accelerator.is_main_process
        self.global_batch = train.batch_size * self.world * train.grad_accum
        self.steps_per_epoch = train.steps_per_epoch or samples_per_epoch // self.global_batch
        if self.steps_per_epoch < 1:
            raise SettingError(f"{samples_per_epoch} samples per epoch do not fill one global batch of {self.global_batch}")
        epochs, spe = train.epochs, self.steps_per_epoch
        self.total = epochs * spe
        self.lr = cosine_schedule(scaled_lr(optim.lr, self.global_batch), optim.min_lr, epochs, spe,
                                  optim.warmup_epochs)
        self.weight_decay = cosine_schedule(optim.weight_decay, optim.weight_decay_end, epochs, spe)
        self.momentum = cosine_schedule(dino.momentum_teacher, 1.0, epochs, spe)

        torch.manual_seed(settings.seed)  # the same initial weights on every process
        student, self.teacher = (select_attention(model, self.device, accelerator.mixed_precision)
                                 for model in _student_and_teacher(backbone, dino))
        self.dino_loss = DINOLoss(dino.out_dim, 2 + settings.crops.n_local, dino.warmup_teacher_temp,
                                  dino.teacher_temp, dino.warmup_teacher_temp_epochs, epochs)
        state = resume_state(settings, self.checkpoint_path)
        if state is not None:
            student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.dino_loss.load_state_dict(state["dino_loss"])
        optimizer = dino_optimizer(optim.name, weight_decay_groups(student))
        self.student, self.optimizer = accelerator.prepare(student, optimizer)
        self.teacher.to(self.device)
        self.dino_loss.to(self.device)
        self.start, self.saved_step, position = 0, None, (0, 0)
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            if accelerator.scaler is not None:
                accelerator.scaler.load_state_dict(state["scaler"])
            self.start = self.saved_step = state["step"]
            position = self._resume_position(state["data_positions"])
            log.info("resuming %s at step %d of %d", self.checkpoint_path, self.start, self.total)
        self.batches = EpochBatches(stream, train.batch_size, settings.data.workers, position,
                                    pin_memory=self.device.type == "cuda")

    def _resume_position(self, positions: list[list[int]]) -> tuple[int, int]:
        """This process's saved place in its stream; defined only for the saved number of processes."""
        if len(positions) == self.world:
            return tuple(positions[self.rank])
        restart = max(epoch for epoch, _ in positions) + 1
        log.warning("resuming on %d processes a run saved on %d: data restarts at stream epoch %d, so the "
                    "continuation is not identical to an uninterrupted run", self.world, len(positions), restart)
        return restart, 0

    def save(self, step: int) -> None:
        """Checkpoint after ``step`` steps, with every process's place in its stream."""
        accelerator = self.accelerator
        positions = accelerator.gather(torch.tensor([self.batches.position], device=self.device)).tolist()
        if self.main:
            save_checkpoint(self.checkpoint_path, {
                "student": accelerator.unwrap_model(self.student).state_dict(),
                "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "dino_loss": self.dino_loss.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
                "epoch": step // self.steps_per_epoch, "step": step, "data_positions": positions,
                "config": self.settings.to_mapping(),
            })
        self.saved_step = step
        accelerator.wait_for_everyone()

    def _stop_on_non_finite(self, value: float, step: int, epoch: int) -> None:
        if math.isfinite(value):
            return
        saved = (f"{self.checkpoint_path} (after step {self.saved_step})" if self.saved_step is not None
                 else "none (no checkpoint was written yet)")
        message = (f"DINO loss is {value} at step {step} (epoch {epoch}); stopped without applying or saving this "
                   f"step. Last good checkpoint: {saved}. Lower optim.lr, raise optim.warmup_epochs or use bf16 "
                   "instead of fp16, check the inputs, then continue with resume=true.")
        log.error(message)
        raise NonFiniteLossError(message)

    def micro_step(self, step: int, epoch: int, micro: int) -> float:
        """Forward and backward of one micro-batch (the optimizer steps on the last); returns the loss
        averaged over all processes."""
        settings, accelerator, student, optimizer = self.settings, self.accelerator, self.student, self.optimizer
        place = micro * self.world + self.rank  # this micro-batch's index in the global batch
        inputs = next(self.batches)["pixels"].to(self.device, non_blocking=True)
        if inputs.is_floating_point():
            inputs = inputs.float()  # token grids may be stored as float16; autocast lowers where enabled
        crops = make_crops(self.multicrop, inputs, settings.seed, step, place, settings.train.augment_chunk)
        torch.manual_seed(derived_seed(settings.seed, step, place, DROP_PATH))
        with accelerator.accumulate(student):
            with torch.no_grad(), accelerator.autocast():
                teacher_output = self.teacher(crops[:2])  # the teacher sees the global crops only
            loss = self.dino_loss(student(crops), teacher_output, epoch)
            value = accelerator.reduce(loss.detach(), reduction="mean").item()
            self._stop_on_non_finite(value, step, epoch)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.unscale_gradients(optimizer)
                if settings.optim.clip_grad:
                    clip_gradients_per_parameter(student, settings.optim.clip_grad)
                cancel_last_layer_gradients(student, epoch, settings.dino.freeze_last_layer)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return value

    def _log_step(self, step: int, epoch: int, loss: float, seconds: float) -> dict[str, Any]:
        entry = {"step": step, "epoch": epoch, "loss": loss, "lr": float(self.lr[step]),
                 "weight_decay": float(self.weight_decay[step]), "momentum": float(self.momentum[step]),
                 "teacher_temp": self.dino_loss.teacher_temperature(epoch), "seconds": seconds}
        with open(self.out / TRAIN_LOG, "a") as handle:
            handle.write(json.dumps(entry) + "\n")
        track(self.accelerator, {**{k: v for k, v in entry.items() if k not in ("step", "epoch", "seconds")},
                                 "samples_per_s": self.global_batch / seconds}, step, "train/")
        if (step + 1) % self.settings.train.log_every == 0:
            log.info("step %d/%d epoch %d loss %.4f lr %.3g", step + 1, self.total, epoch, loss, self.lr[step])
        return entry

    def train(self) -> Path:
        """Run (or continue) to the last step, or to train.stop_after; returns the output folder."""
        train = self.settings.train
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(self.settings, self.out)
            keep_log_before(self.out / TRAIN_LOG, self.start)
        start_tracking(self.accelerator, "dino", self.settings.to_mapping())
        if self.main:
            log.info("DINO: %d steps (%d epochs x %d), global batch %d = %d per process x %d processes x %d "
                     "accumulated; peak lr %.3g", self.total, train.epochs, self.steps_per_epoch,
                     self.global_batch, train.batch_size, self.world, train.grad_accum, self.lr.max())
        end = min(self.total, train.stop_after or self.total)
        bar = progress(range(self.start, end), initial=self.start, total=self.total, desc="dino", unit="step",
                       disable=not self.main)
        started = time.perf_counter()
        for step in bar:
            epoch = step // self.steps_per_epoch
            set_lr_and_weight_decay(self.optimizer, float(self.lr[step]), float(self.weight_decay[step]))
            loss = sum(self.micro_step(step, epoch, micro) for micro in range(train.grad_accum)) / train.grad_accum
            update_teacher(self.accelerator.unwrap_model(self.student), self.teacher, float(self.momentum[step]))
            if self.main:  # seconds: the step's wall clock, data included (what a time budget buys)
                self._log_step(step, epoch, loss, time.perf_counter() - started)
                bar.set_postfix(loss=f"{loss:.4f}", epoch=epoch)
            if (step + 1) % train.checkpoint_every == 0 or step + 1 == end:
                self.save(step + 1)
            started = time.perf_counter()  # checkpoints are not part of the next step
        if self.main and end == self.total:
            export_safetensors(self.teacher.backbone, self.out / BACKBONE_EXPORT,
                               {"format": "pt", "source": "DINO teacher backbone", "steps": str(self.total)})
            if self.card is not None:
                write_card(self.out / BACKBONE_EXPORT, {**self.card, "source": "dino", "steps": self.total})
            log.info("done: %s (teacher backbone), %s (DINO layout)", self.out / BACKBONE_EXPORT, self.checkpoint_path)
        elif self.main:
            log.info("stopped after step %d of %d; continue with resume=true", end, self.total)
        stop_tracking(self.accelerator)
        return self.out


def train_dino(settings: DINOSettings, backbone: Callable[[float], nn.Module], stream: IterableDataset,
               multicrop: Callable[..., list[torch.Tensor]], samples_per_epoch: int,
               card: Mapping[str, Any] | None = None) -> Path:
    """Train (or continue) DINO; the output folder receives config.yaml, train_log.jsonl, checkpoint.pt (the
    released DINO layout: student/teacher with backbone./head. keys) and, when complete, backbone.safetensors
    (the teacher's backbone) with `card` as its model_card.json. Returns the folder."""
    return DINOTrainer(settings, backbone, stream, multicrop, samples_per_epoch, card).train()
