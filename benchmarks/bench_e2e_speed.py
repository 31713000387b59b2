"""End-to-end training speed against the tile encoder's own forward-only speed, in one process.

    python benchmarks/bench_e2e_speed.py                                   # synthetic shards of that geometry
    python benchmarks/bench_e2e_speed.py --shards runs/lymphoma/shards256  # the lymphoma fields

The configuration is recipes/configs/lymphoma_e2e.yaml (256 px regions of 4 x 4 tiles of 64 px, ViT patch 8
192-d 4 blocks -> ViT4K -> slide transformer, bf16 autocast, augmentation on, every stage trainable); extra
key=value arguments override it. "train" is one epoch of fold 0 through the real engine
(hipt_e2e.training.e2e.FoldTrainer.train_epoch: region reading and decoding, augmentation, forward,
backward, AdamW), its tiles counted as they enter the model; "forward-only" is the same tile encoder on
batches of --batch random tiles without gradients (best of --rounds, measured before and after). The
validation pass that follows every epoch (every region of the validation fields, no gradients) is timed too.
Last line: `train tiles/s: A, forward-only tiles/s: B, ratio: A/B`.
"""
from __future__ import annotations

import argparse
import copy
import logging
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from hipt_e2e.config import resolve_settings, setup_logging
from hipt_e2e.data.regions import ShardRegions
from hipt_e2e.data.synthetic import make_dataset
from hipt_e2e.evaluation.splits import make_folds
from hipt_e2e.normalise import normalise
from hipt_e2e.runtime import make_accelerator
from hipt_e2e.training.e2e import E2ESettings, FoldTrainer
from shards.build import BuildSettings, build

log = logging.getLogger("bench_e2e_speed")
REPO = Path(__file__).resolve().parents[1]


def synthetic_shards(root: Path) -> Path:
    """36 synthetic slides of 512 px cut into 256 px regions of 64 px tiles (the lymphoma shard geometry)."""
    slides = make_dataset(root / "slides", slides_per_class=18, size=512, region_px=256)
    build(BuildSettings.from_mapping({"kind": "images", "input": str(slides), "labels": str(slides / "labels.csv"),
                                      "out": str(root / "shards"),
                                      "slide_mpp": 0.5, "region_px": 256, "tile_px": 64, "min_tissue": 0.25, "encoding": "png"}))
    return root / "shards"


def forward_pass(tile_encoder: torch.nn.Module, tile_px: int, normalisation: str, batch: int, rounds: int,
                 autocast) -> tuple[int, float]:
    """(tiles, seconds) of `rounds` calls of the tile encoder alone on `batch` tiles: normalise + forward,
    no gradients (after one warm-up call)."""
    tiles = torch.randint(0, 256, (batch, 3, tile_px, tile_px), dtype=torch.uint8)
    with torch.no_grad(), autocast():
        tile_encoder(normalise(tiles, normalisation))
        start = time.perf_counter()
        for _ in range(rounds):
            tile_encoder(normalise(tiles, normalisation))
    return batch * rounds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=None)
    parser.add_argument("--config", type=Path, default=REPO / "recipes" / "configs" / "lymphoma_e2e.yaml")
    parser.add_argument("--batch", type=int, default=256, help="tiles per forward-only call")
    parser.add_argument("--rounds", type=int, default=10, help="forward-only calls before and after each epoch")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs timed")
    parser.add_argument("overrides", nargs="*", help="key=value over the config")
    args = parser.parse_args()
    setup_logging()
    with tempfile.TemporaryDirectory() as scratch:
        shards = args.shards or synthetic_shards(Path(scratch))
        settings = resolve_settings(E2ESettings, args.config,
                                    [f"data.shards={shards}", f"out={scratch}/run", *args.overrides])
        torch.set_num_threads(settings.train.threads or torch.get_num_threads())
        accelerator = make_accelerator(settings.train.mixed_precision)
        regions = ShardRegions(shards, regions_per_slide=settings.data.regions_per_slide, seed=settings.seed)
        fold = make_folds(regions.infos(), settings.folds, settings.seed)[0]
        trainer = FoldTrainer(accelerator, settings, regions, regions.manifest["classes"], fold, Path(scratch) / "fold", 0)
        trainer.dir.mkdir(parents=True)
        model = accelerator.unwrap_model(trainer.model)
        tiles = [0]
        model.register_forward_pre_hook(lambda _, inputs: tiles.__setitem__(
            0, tiles[0] + inputs[0].shape[0] * (inputs[0].shape[-1] // model.tile_px) ** 2))
        encoder = copy.deepcopy(model.tile_encoder).eval()
        # Forward-only passes before every epoch and after the last, the epochs between them: load from other
        # jobs (and the CPU's clock) drifts over a run, and both rates are averaged over the same stretch.
        forward_tiles = forward_s = train_tiles = train_s = 0
        for epoch in range(args.epochs + 1):
            n, seconds = forward_pass(encoder, model.tile_px, settings.model.normalisation, args.batch, args.rounds, accelerator.autocast)
            forward_tiles, forward_s = forward_tiles + n, forward_s + seconds
            if epoch == args.epochs:
                break
            tiles[0], start = 0, time.perf_counter()
            trainer.train_epoch(tqdm(disable=True))
            train_tiles, train_s = train_tiles + tiles[0], train_s + time.perf_counter() - start
            trainer.epoch, trainer.step = trainer.epoch + 1, 0  # the next epoch's slide order (no validation)
        start = time.perf_counter()
        trainer.predict(fold.val)
        val_s = time.perf_counter() - start
    epoch_s = train_s / args.epochs
    train_rate, forward_rate = train_tiles / train_s, forward_tiles / forward_s
    print(f"\n{len(fold.train)} training slides, {train_tiles // args.epochs} tiles per epoch: {epoch_s:.1f} s per epoch; "
          f"validation of {len(fold.val)} slides: {val_s:.1f} s ({val_s / (epoch_s + val_s):.0%} of an epoch); "
          f"{torch.get_num_threads()} threads, {accelerator.mixed_precision} precision")
    print(f"train tiles/s: {train_rate:.0f}, forward-only tiles/s: {forward_rate:.0f}, ratio: {train_rate / forward_rate:.3f}")

if __name__ == "__main__":
    main()
