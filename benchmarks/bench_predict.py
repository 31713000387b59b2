"""How close `hipt-predict` gets to the model's own speed: predicted tiles/s on a whole-slide file against
the same tile encoder's forward-only tiles/s, in one process.

    python benchmarks/bench_predict.py --preset tiny                 # 16 x 16 regions of 128 px (4 x 4 tiles of 32 px)
    python benchmarks/bench_predict.py --preset hipt --regions 2     # 4096 px regions of 256 tiles (ViT-S/16)
    python benchmarks/bench_predict.py --preset tiny --tta dihedral  # every region in its 8 poses: the cost of TTA

The slide is a generated tiled TIFF at 0.5 um/px (OpenSlide reads it as a real slide would be read);
prediction is the whole `predict_inputs` path (reading and tiling in a background thread, normalisation,
tile encoder, ViT4K, slide model, heatmaps off), the model randomly initialised. Forward-only is the tile
encoder on batches of one region's tiles, no gradients, timed before and after. Same precision for both
(`--mixed-precision`); tiles/s count the slide's tiles once whatever `--tta`. Last line: `predict tiles/s:
A, forward-only tiles/s: B, ratio: A/B`.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from accelerate import Accelerator

from hipt_e2e.config import resolve_settings, setup_logging
from hipt_e2e.inference.predict import Predictor, PredictSettings, predict_inputs
from hipt_e2e.models import HIPT, model_preset, select_attention
from hipt_e2e.normalise import normalise


def write_slide(path: Path, width: int, height: int) -> Path:
    """A tiled RGB TIFF of tissue-like noise with a 0.5 um/px resolution tag."""
    pixels = np.random.default_rng(0).integers(60, 200, (height, width, 3), dtype=np.uint8)
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    return path


def forward_pass(model: HIPT, tiles: torch.Tensor, rounds: int, autocast) -> tuple[int, float]:
    with torch.no_grad(), autocast():
        model.tile_encoder(normalise(tiles, model.normalisation))
        start = time.perf_counter()
        for _ in range(rounds):
            model.tile_encoder(normalise(tiles, model.normalisation))
    return len(tiles) * rounds, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--regions", type=int, default=None, help="regions in the slide (default: 256 tiny, 2 hipt)")
    parser.add_argument("--rounds", type=int, default=3, help="forward-only calls before and after")
    parser.add_argument("--mixed-precision", default="bf16")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--tta", default="none", help="none | dihedral")
    args = parser.parse_args()
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    geometry = model_preset(args.preset)
    region_px = geometry["tile_px"] * geometry["region_tiles"]
    regions = args.regions or (256 if args.preset == "tiny" else 2)
    side = int(np.ceil(np.sqrt(regions)))
    rows = int(np.ceil(regions / side))
    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    torch.manual_seed(0)
    model = HIPT.from_preset(args.preset, 2).eval().to(accelerator.device)
    select_attention(model, accelerator.device, accelerator.mixed_precision)  # as the predictor will
    tiles = torch.randint(0, 256, (geometry["region_tiles"] ** 2, 3, geometry["tile_px"], geometry["tile_px"]),
                          dtype=torch.uint8, device=accelerator.device)
    with tempfile.TemporaryDirectory() as scratch:
        slide = write_slide(Path(scratch) / "slide.tiff", side * region_px, rows * region_px)
        settings = resolve_settings(PredictSettings, None, [f"out={scratch}/out", f"model.preset={args.preset}",
                                                            "geometry.min_tissue=0", "top_regions=0",
                                                            f"mixed_precision={args.mixed_precision}", f"tta={args.tta}"])
        before = forward_pass(model, tiles, args.rounds, accelerator.autocast)
        predictor = Predictor([(model, None)], ["a", "b"], chunk_regions=settings.chunk_regions, tta=args.tta)
        start = time.perf_counter()
        assert predict_inputs(settings, [slide], predictor) == 0
        predict_s = time.perf_counter() - start
        after = forward_pass(model, tiles, args.rounds, accelerator.autocast)
    n_tiles = side * rows * geometry["region_tiles"] ** 2
    predicted, forward = n_tiles / predict_s, (before[0] + after[0]) / (before[1] + after[1])
    print(f"\n{args.preset}: {side * rows} regions of {region_px} px ({n_tiles} tiles) in {predict_s:.1f} s, "
          f"{accelerator.device.type}, {torch.get_num_threads()} threads, {args.mixed_precision}, tta {args.tta}")
    print(f"predict tiles/s: {predicted:.0f}, forward-only tiles/s: {forward:.0f}, ratio: {predicted / forward:.3f}")


if __name__ == "__main__":
    main()
