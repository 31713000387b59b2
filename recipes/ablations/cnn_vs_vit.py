"""Ablation: which tile encoder, a CNN or a ViT, trained here or pretrained elsewhere?

For each tile encoder of `encoders` (by default a ViT and a timm CNN, both from random init; an entry
with model.weights=FILE, e.g. [model.encoder=resnet50, model.weights=/models/resnet50.pth] or
[model.encoder=uni_v1, model.weights=/models/UNI], is taken as pretrained and skips DINO) the staged path
runs with the same settings: DINO pretraining with recipes/pretrain_vit256.py (the same config, budget and
seed, plus the encoder's own settings, e.g. a CNN's optimizer), recipes/embed_tiles.py with its teacher
backbone (or the given weights), recipes/embed_regions.py (by default a frozen,
randomly initialised ViT4K with model.region.in_dim = the tile width, seeded so both encoders get the
same one), then the same slide model cross-validated on the same folds (slide-level settings at the top
level, as in the other ablations). Also measured: parameters and tile throughput (tiles/s, one batch,
CPU) of each pretrained encoder. With pretrain.minutes set, both get the same wall-clock DINO budget
instead of the same steps: each encoder's seconds per DINO step are timed on two short probe runs (their
difference cancels start-up) and its train.epochs chosen to fill the minutes.
Writes docs/ablations/cnn_vs_vit.{md,json,png}; runs in out/<encoder>/.

    accelerate launch recipes/ablations/cnn_vs_vit.py --config recipes/configs/ablations/cnn_vs_vit.yaml \
        data.shards=runs/lymphoma/shards256 out=runs/ablations/cnn_vs_vit
"""
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from torch import nn

from hipt_e2e.config import Settings, bound, load_yaml, section
from hipt_e2e.data.embeddings import read_slide_bags
from hipt_e2e.errors import SettingError, run_main
from hipt_e2e.evaluation.ablation import folds_text, paired_answer, write_ablation
from hipt_e2e.lineage import read_lineage
from hipt_e2e.models.encoders import BACKBONE_EXPORT, TileModelWithWeights, build_tile_encoder, load_encoder_weights
from hipt_e2e.training.checkpointing import TRAIN_LOG
from hipt_e2e.training.recipe import recipe_settings
from hipt_e2e.training.slide_level import SlideSettings, cross_validate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the stage recipes run as they are, not copied
import embed_regions  # noqa: E402
import embed_tiles  # noqa: E402
import pretrain_vit256  # noqa: E402

DEFAULT_ENCODERS = {"vit": ["model.encoder=vit"], "cnn": ["model.encoder=cnn", "model.cnn=resnet18"]}
LAB_SCALE = ("At 256 px tiles of 4096 px regions on GPUs a lab compares the encoders it has weights for: `accelerate "
             "launch recipes/ablations/cnn_vs_vit.py --config recipes/configs/ablations/cnn_vs_vit.yaml data.shards=SHARDS "
             "out=runs/encoders 'encoders={vit: [model.encoder=vit], resnet50: [model.encoder=resnet50, "
             "model.weights=/models/resnet50.pth], uni: [model.encoder=uni_v1, model.weights=/models/UNI]}'` "
             "(pretrained entries skip DINO; tiles are resized to their 224 px input on the device). DINO then runs "
             "for GPU-days rather than CPU-minutes; the recipe takes the budget as pretrain.overrides.")


@dataclass(frozen=True)
class Stage(Settings):
    """A stage recipe's --config file and key=value overrides."""

    config: str | None = None
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pretrain(Stage):
    """The DINO stage; minutes: an equal wall-clock budget per encoder, from each one's step time over
    probe_steps steps (null: the same steps for all)."""

    minutes: float | None = bound(None, 0.0)
    probe_steps: int = bound(20, 1)


@dataclass(frozen=True)
class Throughput(Settings):
    batch: int = bound(64, 1)
    rounds: int = bound(3, 1)


@dataclass(frozen=True)
class CnnVsVit(SlideSettings):
    """This ablation's settings: slide-level training's (data.shards: the region shards every stage starts
    from), the encoders, their stages and where the write-up goes."""

    docs: str = "docs/ablations"
    # name -> key=value settings of one encoder (model.* for every stage, the rest for its DINO); {}: DEFAULT_ENCODERS
    encoders: dict = field(default_factory=dict)
    tile_model: tuple[str, ...] = ()  # model.* settings for every encoder
    pretrain: Pretrain = section(Pretrain)
    embed_tiles: Stage = section(Stage)
    embed_regions: Stage = section(Stage)
    throughput: Throughput = section(Throughput)


def fresh_precision() -> None:
    """Let the next stage's Accelerator set its own mixed precision: accelerate fixes it once per process
    (DINO's bf16 would refuse the slide model's fp32). The processes' PartialState is kept."""
    AcceleratorState._reset_state(reset_partial_state=False)


def run_stage(recipe, stage: Stage, *overrides: str) -> None:
    """A stage recipe's main, as its command line: --config FILE, the stage's overrides, then these."""
    config = ["--config", stage.config] if stage.config else []
    fresh_precision()
    recipe.main([*config, *stage.overrides, *overrides])


def cross_validated(bags: list, classes: list[str], run: SlideSettings) -> dict:
    """The slide model cross-validated on one encoder's bags, or the metrics of that same cross-validation
    finished by an earlier run of the recipe (the same slide-level settings; trackers aside), as DINO and the
    embeddings are kept."""
    out = Path(run.out)
    settings = run.to_mapping()
    if (out / "metrics.json").exists():
        done = load_yaml((out / "config.yaml").read_text())
        if all(done.get(key) == value for key, value in settings.items() if key not in ("train", "out")):
            return json.loads((out / "metrics.json").read_text())
    fresh_precision()
    return cross_validate(bags, classes, run)


def dino_epochs_for(stage: Pretrain, *overrides: str) -> tuple[int, float]:
    """(train.epochs that fill stage.minutes of wall clock, seconds per step) for one encoder's DINO, from a
    probe run of stage.probe_steps steps: the median of its logged step times after the first quarter
    (start-up, the data stream's first fill)."""
    probe_steps = stage.probe_steps
    with tempfile.TemporaryDirectory() as probe:
        # enough epochs for the probe whatever the epoch length; the schedule does not change a step's time
        run_stage(pretrain_vit256, stage, *overrides, f"out={probe}", f"train.epochs={probe_steps}",
                  f"train.stop_after={probe_steps}")
        steps_per_epoch = load_yaml((Path(probe) / "config.yaml").read_text())["train"]["steps_per_epoch"]
        logged = [json.loads(line) for line in (Path(probe) / TRAIN_LOG).read_text().splitlines()]
    if not steps_per_epoch:
        raise SettingError("pretrain.minutes needs a fixed train.steps_per_epoch in the pretraining settings")
    per_step = float(np.median([entry["seconds"] for entry in logged[probe_steps // 4:]]))
    return max(1, math.ceil(stage.minutes * 60 / per_step / steps_per_epoch)), per_step


def budget_row(name: str, params: int, rate: float, dino_dir: Path, per_step: float | None,
               minutes: float | None) -> str:
    """Markdown row: encoder | parameters | tiles/s | DINO steps | probed s/step | DINO minutes."""
    if not (dino_dir / "config.yaml").exists():
        return f"| {name} | {params / 1e6:.2f} M | {rate:.0f} | pretrained elsewhere | - | - |"
    train = load_yaml((dino_dir / "config.yaml").read_text())["train"]
    steps = f"{train['epochs']} x {train['steps_per_epoch']}" if train["steps_per_epoch"] else f"{train['epochs']} epochs"
    measured = " | ".join(f"{value:.3g}" if value else "-" for value in (per_step, minutes))
    return f"| {name} | {params / 1e6:.2f} M | {rate:.0f} | {steps} | {measured} |"


@torch.no_grad()
def tiles_per_second(encoder: nn.Module, tile_px: int, batch: int, rounds: int) -> float:
    """Best of `rounds` timed passes over one batch of tiles after a warm-up: load from other processes
    only ever slows a round down, so the best round is the steadiest measure."""
    encoder.eval()
    tiles = torch.rand(batch, 3, tile_px, tile_px)
    encoder(tiles)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        encoder(tiles)
        times.append(time.perf_counter() - start)
    return batch / min(times)


def pretrain(cfg: CnnVsVit, name: str, model_args: list[str], out: Path, budgets: dict) -> None:
    """DINO of one encoder into out/dino (kept when the recipe reruns), with the same budget for all."""
    if (out / "dino" / BACKBONE_EXPORT).exists():
        return
    dino_args = [*model_args, f"seed={cfg.seed}", f"data.shards={cfg.data.shards}"]
    per_step = None
    if cfg.pretrain.minutes:
        epochs, per_step = dino_epochs_for(cfg.pretrain, *dino_args)
        dino_args.append(f"train.epochs={epochs}")
    started = time.time()
    run_stage(pretrain_vit256, cfg.pretrain, *dino_args, f"out={out / 'dino'}")
    budgets[name] = (per_step, (time.time() - started) / 60)


def slide_bags(cfg: CnnVsVit, name: str, encoder_args: tuple[str, ...], budgets: dict) -> tuple[Path, nn.Module]:
    """One encoder's stages: DINO (unless it has weights), its token grids, the region bags (out/<name>/bags);
    returns the bags' folder and the encoder as embedded."""
    out = Path(cfg.out) / name
    # model.* settings describe the encoder (every stage); the rest (optim.*, crops.*, ...) its DINO recipe
    model_args = [arg for arg in [*cfg.tile_model, *encoder_args] if arg.startswith("model.")]
    if any(arg.startswith("model.weights=") for arg in encoder_args):  # pretrained elsewhere: no DINO here
        embed_args = model_args
    else:
        pretrain(cfg, name, [*cfg.tile_model, *encoder_args], out, budgets)
        dino = load_yaml((out / "dino" / "config.yaml").read_text())
        embed_args = [*model_args, f"model.weights={out / 'dino' / BACKBONE_EXPORT}",
                      f"embed.normalisation={dino['data']['normalisation']}"]
    run_stage(embed_tiles, cfg.embed_tiles, *embed_args, f"data.shards={cfg.data.shards}", f"out={out / 'grids'}")
    embedded = TileModelWithWeights.from_mapping(load_yaml((out / "grids" / "config.yaml").read_text())["model"])
    encoder = load_encoder_weights(build_tile_encoder(embedded), embedded)
    torch.manual_seed(cfg.seed)  # a random ViT4K is then the same one for every encoder
    run_stage(embed_regions, cfg.embed_regions, f"model.region.in_dim={encoder.num_features}",
              f"data.shards={out / 'grids'}", f"out={out / 'bags'}")
    return out / "bags", encoder


def main(argv: list[str] | None = None) -> dict:
    cfg = recipe_settings(CnnVsVit, __doc__, argv, required=("out", "data.shards"))
    encoders = cfg.encoders or DEFAULT_ENCODERS
    tile_px = read_lineage(cfg.data.shards).geometry.tile_px
    start, variants, speed, budgets = time.time(), {}, {}, {}
    for name, encoder_args in encoders.items():
        bags_dir, encoder = slide_bags(cfg, name, encoder_args, budgets)
        speed[name] = (sum(p.numel() for p in encoder.parameters()),
                       tiles_per_second(encoder, tile_px, cfg.throughput.batch, cfg.throughput.rounds))
        bags, classes = read_slide_bags(bags_dir)
        slide = {key: value for key, value in cfg.to_mapping().items() if key in SlideSettings.__dataclass_fields__}
        variants[name] = cross_validated(bags, classes, SlideSettings.from_mapping(
            {**slide, "out": str(Path(cfg.out) / name / "slide")}))
    if PartialState().is_main_process:
        vit4k = load_yaml((bags_dir / "config.yaml").read_text())["model"]["weights"]
        write_report(cfg, variants, classes, speed, budgets, tile_px, time.time() - start, setup=(
            f"{len(bags)} slides from `{cfg.data.shards}` ({tile_px} px tiles); encoders: "
            + "; ".join(f"{n} {' '.join([*cfg.tile_model, *a])}" for n, a in encoders.items())), vit4k=vit4k)
    return variants


def write_report(cfg: CnnVsVit, variants: dict, classes: list[str], speed: dict, budgets: dict, tile_px: int,
                 runtime_s: float, setup: str, vit4k: str | None) -> None:
    """docs/ablations/cnn_vs_vit.{md,json,png}: the paired comparison, with each encoder's size, speed and budget."""
    pretrain = cfg.pretrain
    dino_budget = load_yaml(Path(pretrain.config).read_text()).get("train", {}) if pretrain.config else {}
    batch = dino_budget.get("batch_size", "the recipe's")
    table = ["| encoder | parameters | tiles/s | DINO steps | probed s/step | DINO minutes (this run) |",
             "|---|---|---|---|---|---|",
             *(budget_row(name, *speed[name], Path(cfg.out) / name / "dino", *budgets.get(name, (None, None)))
               for name in speed), "",
             f"Throughput: forward passes over one batch of {cfg.throughput.batch} random {tile_px} px tiles "
             f"on the CPU ({torch.get_num_threads()} threads), best of {cfg.throughput.rounds} rounds.", ""]
    answer = (paired_answer(variants) + " Throughput and size: "
              + "; ".join(f"{name} {rate:.0f} tiles/s with {params / 1e6:.2f} M parameters"
                          for name, (params, rate) in speed.items()) + ".")
    budget = (f"the same {pretrain.minutes:g} wall-clock minutes each (steps below)" if pretrain.minutes
              else "the same steps each (below)")
    write_ablation(cfg.docs, "cnn_vs_vit", "CNN vs ViT tile encoder",
                   "Can a CNN produce the tile embeddings, each encoder trained with a recipe for its kind (or "
                   "pretrained elsewhere) and followed by the same slide model on the same folds?", variants, classes,
                   answer=answer, runtime_s=runtime_s, extra_lines=table,
                   run_dirs={name: Path(cfg.out) / name / "slide" for name in variants},
                   lab_scale=LAB_SCALE,
                   setup=f"{setup}; DINO of the encoders without weights ({pretrain.config or 'recipe defaults'}, "
                         f"{batch} tiles per step, pretrain.overrides and each encoder's own) for {budget}; "
                         f"ViT4K: {vit4k or 'random init, frozen, the same for both'}; slide model {cfg.model.name}, "
                         f"{folds_text(cfg.folds, cfg.cv.repeats, cfg.seed)}, at most {cfg.optim.epochs} epochs, patience {cfg.patience}.")


if __name__ == "__main__":
    sys.exit(run_main(main))
