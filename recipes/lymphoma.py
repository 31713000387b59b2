"""The lymphoma pipeline in one command: the shared images -> cross-validated metrics against colour.

    python recipes/lymphoma.py --seed 0 --out runs/lymphoma_s0 [--repeats 3]

Steps, each skipped when its output is complete (so running the same command again resumes a stopped run):
  1. shards of the images (treated as 0.5 um/px): 128 px regions of 64 px tiles for DINO, 256 px regions
     with >= 25 % tissue for fine-tuning, both written in an order shuffled by the seed;
  2. DINO on the tiles (recipes/configs/lymphoma_pretrain_vit256.yaml);
  3. the tiles' token grids and DINO of ViT4K on them;
  4. end-to-end fine-tuning from both DINO encoders with augmentation (recipes/configs/lymphoma_e2e.yaml),
     --repeats x 5 patient-grouped folds, as --processes data-parallel processes (global batch 4 fields);
  5. the colour baseline on the same folds and the paired comparison: report.md.
Every random choice (shard order, DINO, folds, training, augmentation) derives from --seed. The last line:
`balanced accuracy: X +- Y over R x K folds (colour baseline on the same folds: Z)`.
`--budget smoke` runs every step with a few steps each (the test suite's check that the command works).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from hipt_e2e.config import HelpFormatter, resolve_settings, setup_logging
from hipt_e2e.errors import run_main
from hipt_e2e.evaluation.compare import compare_runs, load_run
from hipt_e2e.io import atomic_write_text
from hipt_e2e.training.colour_baseline import colour_baseline
from hipt_e2e.training.e2e import E2ESettings
from shards.build import BuildSettings, build

RECIPES = Path(__file__).resolve().parent
IMAGES = RECIPES.parent.parent / "shared" / "data" / "lymphoma-iicbu2008"
TILE = ["model.preset=tiny", "model.tile.patch_size=8", "model.tile.embed_dim=192", "model.tile.depth=4",
        "model.tile.num_heads=3", "model.tile.pos_grid=7"]
REGION = ["model.preset=tiny", "model.region.in_dim=192", "model.region.embed_dim=192", "model.region.depth=2",
          "model.region.num_heads=3", "model.region.pos_grid=4"]
VIT4K = ["crops.global_size=3", "crops.local_size=2", "crops.n_local=4", "dino.out_dim=4096", "dino.hidden_dim=512",
         "optim.warmup_epochs=2", "train.epochs=20", "train.batch_size=64", "data.workers=0"]
# Fields per optimizer step (the config's train.grad_accum for one process), kept for any --processes.
E2E_GLOBAL_BATCH = resolve_settings(E2ESettings, RECIPES / "configs" / "lymphoma_e2e.yaml").train.grad_accum
BUDGETS = {  # extra settings per step
    "full": {"dino": [], "vit4k": [], "e2e": []},
    "smoke": {"dino": ["train.epochs=1", "train.steps_per_epoch=2", "train.batch_size=8", "data.workers=0",
                       "optim.warmup_epochs=0"],
              "vit4k": ["train.epochs=1", "train.steps_per_epoch=2", "train.batch_size=8", "optim.warmup_epochs=0"],
              "e2e": ["train.epochs=1", "train.threads=1"]},
}


def recipe(name: str, *settings: str, processes: int = 1) -> None:
    """Run recipes/NAME.py in a process of its own (its threads, memory and logs), or as `processes`
    data-parallel processes through `accelerate launch` (on CPUs one thread each)."""
    script = str(RECIPES / f"{name}.py")
    if processes == 1:
        _stage([sys.executable, script, *settings])
        return
    with socket.socket() as probe:  # a free port: two pipelines may run side by side
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cpu = not torch.cuda.is_available()
    env = {**os.environ, **({"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"} if cpu else {})}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    _stage([*launch, "-q", script, *settings, *(["train.threads=1"] if cpu else [])], env=env)


def _stage(command: list[str], env: dict[str, str] | None = None) -> None:
    """Run a stage; if it fails, exit with its code: it has said why (its one `error:` line, or a bug's
    traceback), which a CalledProcessError traceback here would only bury."""
    code = subprocess.run(command, env=env).returncode
    if code:
        raise SystemExit(code)


def resumed(out: Path) -> list[str]:
    return ["resume=true"] if out.exists() else []


def default_processes() -> int:
    """One per GPU (up to 4, dividing the global batch), else 2 CPU processes where there are 2 cores."""
    available = torch.cuda.device_count() or (2 if (os.cpu_count() or 1) >= 2 else 1)
    return max(n for n in (1, 2, 4) if n <= available)


def finished(run: Path, repeats: int) -> bool:
    """The cross-validated run in `run` is complete with this many repeats (a run asked for more repeats
    continues where the fewer-repeat one stopped)."""
    metrics = run / "metrics.json"
    return metrics.exists() and json.loads(metrics.read_text())["repeats"] == repeats


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--seed", type=int, required=True, help="seed of the build order, training and folds")
    parser.add_argument("--out", type=Path, required=True, help="output folder of every stage")
    parser.add_argument("--repeats", type=int, default=1, help="repeats of the 5-fold cross-validation")
    parser.add_argument("--images", type=Path, default=IMAGES, help="one folder of images per class")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full", help="training budget of the stages")
    parser.add_argument("--processes", type=int, choices=(1, 2, 4), default=default_processes(),
                        help="data-parallel processes for fine-tuning, the same global batch of 4 fields (default here: "
                             "%(default)s; one per GPU, or 2 one-thread processes on 2+ CPU cores: 1.4x one two-thread process)")
    args = parser.parse_args(argv)
    setup_logging()
    out, seed, budget = args.out, args.seed, BUDGETS[args.budget]
    images = {"kind": "images", "input": str(args.images), "labels_from_folders": True, "slide_mpp": 0.5,
              "tile_px": 64, "encoding": "png", "shuffle_seed": seed}
    build(BuildSettings.from_mapping({**images, "out": str(out / "shards"), "region_px": 128, "min_tissue": 0.0, "shard_bytes": 1e6}))
    build(BuildSettings.from_mapping({**images, "out": str(out / "shards256"), "region_px": 256, "min_tissue": 0.25}))

    if not (out / "dino" / "backbone.safetensors").exists():
        recipe("pretrain_vit256", "--config", str(RECIPES / "configs" / "lymphoma_pretrain_vit256.yaml"),
               f"data.shards={out / 'shards'}", f"out={out / 'dino'}", f"seed={seed}", *resumed(out / "dino"),
               *budget["dino"])
    if not (out / "grids" / "manifest.json").exists():
        recipe("embed_tiles", "--config", str(RECIPES / "configs" / "embed_tiles.yaml"), *TILE,
               f"data.shards={out / 'shards256'}", "data.workers=0", f"model.weights={out / 'dino' / 'backbone.safetensors'}",
               "embed.normalisation=imagenet", "embed.dtype=float32", f"out={out / 'grids'}")
    if not (out / "vit4k" / "backbone.safetensors").exists():
        recipe("pretrain_vit4k", "--config", str(RECIPES / "configs" / "pretrain_vit4k.yaml"), *REGION, *VIT4K,
               f"data.shards={out / 'grids'}", f"out={out / 'vit4k'}", f"seed={seed}", *resumed(out / "vit4k"),
               *budget["vit4k"])
    if not finished(out / "e2e", args.repeats):
        recipe("e2e", "--config", str(RECIPES / "configs" / "lymphoma_e2e.yaml"), f"data.shards={out / 'shards256'}",
               f"model.weights.tile={out / 'dino' / 'backbone.safetensors'}",
               f"model.weights.region={out / 'vit4k' / 'backbone.safetensors'}", f"seed={seed}",
               f"cv.repeats={args.repeats}", f"out={out / 'e2e'}", f"train.grad_accum={E2E_GLOBAL_BATCH // args.processes}",
               *resumed(out / "e2e"), *budget["e2e"], processes=args.processes)
    if not finished(out / "colour", args.repeats):
        colour_baseline(args.images, out / "colour", folds=5, seed=seed, repeats=args.repeats)

    runs = [load_run(out / "e2e", "HIPT end to end"), load_run(out / "colour", "colour baseline")]
    lines, _ = compare_runs(runs)
    folds = [run.fold_metrics() for run in runs]
    e2e, colour = ([fold["balanced_accuracy"] for fold in run] for run in folds)
    last = (f"balanced accuracy: {np.mean(e2e):.3f} +- {np.std(e2e, ddof=1):.3f} over {args.repeats} x 5 folds "
            f"(colour baseline on the same folds: {np.mean(colour):.3f})")
    command = " ".join(["python recipes/lymphoma.py", *(argv if argv is not None else sys.argv[1:])])
    atomic_write_text(out / "report.md", "\n".join([
        f"# Lymphoma subtypes (CLL / FL / MCL), seed {seed}", "", f"Command: `{command}`", "",
        "Runs: `e2e/` (report, learning curves, fold models with their cards), `colour/`, `dino/`, `vit4k/`.", "",
        *lines, "", last, ""]))
    print(last)
    return last


if __name__ == "__main__":
    sys.exit(run_main(main))
