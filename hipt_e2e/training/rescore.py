"""Score a finished cross-validated run's test folds again, with its own fold models, under other inference
settings (test-time augmentation, another precision): nothing is trained or selected again, so
`hipt_e2e.evaluation.compare` can pair the two scorings fold by fold.

    python -m hipt_e2e.training.rescore RUN --out OUT --tta dihedral [--shards SHARDS]

RUN: a finished e2e, train_wsi or train_fc run. Regions come from its data.shards or, for a staged run, the
region shards its bags were embedded from (or --shards). OUT gets the run's outputs scored again plus
rescore.json: per fold the seconds, tiles scored and tiles/s, the cost set against the gain.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from accelerate.utils import gather_object

from hipt_e2e.config import HelpFormatter, Settings, bound, setup_logging
from hipt_e2e.data.augment import Tta
from hipt_e2e.data.lineage import PIXELS, Geometry, check_geometry
from hipt_e2e.data.regions import ShardRegions
from hipt_e2e.errors import InputError, SettingError, UserError, run_main
from hipt_e2e.evaluation.splits import Fold, read_splits
from hipt_e2e.inference.predict import Predictor, PredictSettings, predictor_from_cards
from hipt_e2e.io import atomic_write_json
from hipt_e2e.lineage import read_lineage
from hipt_e2e.runtime import Precision, make_accelerator
from hipt_e2e.training.e2e import scorer_chunks
from hipt_e2e.training.folds import fold_settings, run_folds


def _source_config(run: Path) -> dict:
    for needed in ("splits.csv", "config.yaml"):
        if not (run / needed).is_file():
            raise FileNotFoundError(f"{run / needed} not found: {run} is not a finished cross-validated run")
    return yaml.safe_load((run / "config.yaml").read_text())


def pixel_shards(shards: str) -> str:
    """The region shards (pixels) behind a shard set: itself, or the shards its embeddings were made from
    (slide bags <- token grids <- region shards), as each lineage records them."""
    while (lineage := read_lineage(shards)).kind != PIXELS:
        if lineage.source is None:
            raise InputError(shards, f"holds {lineage.kind} of unrecorded origin; give --shards, the region shards "
                                     "the run was trained on")
        shards = lineage.source.shards
    return shards


@dataclass(frozen=True)
class RescoreSettings(Settings):
    """How the fold models infer this time (the command's flags)."""

    tta: Tta = "dihedral"  # test-time augmentation: dihedral averages the 8 flips and rotations
    shards: str | None = None  # region shards (folder or URL); null: the run's data.shards
    chunk_regions: int = bound(16, 1)  # regions per model call
    mixed_precision: Precision = None  # null: the run's train.mixed_precision
    trusted: bool = False  # allow unpickling the cards' released .pth weights


def _fold_predictor(run: Path, fold: Fold, settings: RescoreSettings) -> Predictor:
    return predictor_from_cards(PredictSettings().with_changes(**{
        "model.card": str(run), "model.fold": fold.name, "model.trusted": settings.trusted, "tta": settings.tta,
        "chunk_regions": settings.chunk_regions}))


def _check_fit(predictor: Predictor, regions: ShardRegions, geometry: Geometry, where: str) -> None:
    """The shards must hold the classes and the geometry the fold model was trained on."""
    if predictor.classes != regions.manifest["classes"]:
        raise UserError(f"{where}: its model was trained on classes {predictor.classes}, the shards "
                        f"{regions.manifest['root']} hold {regions.manifest['classes']}; give the region shards "
                        "the run was trained on")
    check_geometry(geometry, regions.manifest["root"], Geometry.of_regions(predictor.geometry), where)


def rescore(run: str | Path, out: str | Path, settings: RescoreSettings | None = None) -> dict:
    """Score every test fold of `run` with its fold model (settings above; None: the defaults); returns OUT's
    metrics, with "rescore": the per-fold cost. mixed_precision None: an e2e run's train.mixed_precision (as
    it evaluated), else no (fp32, as the staged recipes embed by default)."""
    run, out, settings = Path(run), Path(out), settings or RescoreSettings()
    tta, chunk_regions = settings.tta, settings.chunk_regions
    source = _source_config(run)
    shards = settings.shards or (source.get("data") or {}).get("shards")
    if not shards:
        raise SettingError(f"{run}: its config names no data.shards; give shards=, the region shards it was trained on")
    shards = pixel_shards(shards)
    min_tile_tissue = (source.get("data") or {}).get("min_tile_tissue") or 0.0
    precision = settings.mixed_precision or (source.get("train") or {}).get("mixed_precision") or "no"
    accelerator = make_accelerator(precision)
    level = source.get("level", "slide")  # a patient-level run's splits name patients
    regions = ShardRegions(shards, regions_per_slide=None, seed=0, level=level)
    classes = list(regions.manifest["classes"])
    geometry = read_lineage(regions.manifest).geometry
    tiles_per_region = geometry.grid ** 2
    cost: dict[str, dict] = {}

    def test_probs(fold: Fold, fold_dir: Path) -> np.ndarray:
        predictor = _fold_predictor(run, fold, settings).to(accelerator)
        _check_fit(predictor, regions, geometry, str(run / fold.name))
        start, probs, n_regions = time.perf_counter(), {}, 0
        for slide in fold.test[accelerator.process_index::accelerator.num_processes]:
            chunks = [regions[key] for key in regions.chunks(slide, chunk_regions)]
            n_regions += sum(len(chunk["pixels"]) for chunk in chunks)
            probs[slide] = predictor.score(scorer_chunks(chunks, accelerator.device, min_tile_tissue)).probs
        parts = gather_object([(probs, n_regions, time.perf_counter() - start)])
        merged = {slide: p for part, _, _ in parts for slide, p in part.items()}
        seconds, tiles = max(part[2] for part in parts), sum(part[1] for part in parts) * tiles_per_region
        cost[fold.name] = {"seconds": round(seconds, 3), "tiles": tiles, "tiles_per_s": round(tiles / seconds, 1),
                           "poses": len(predictor.poses)}
        return np.stack([merged[slide] for slide in fold.test]) if fold.test else np.zeros((0, len(classes)))

    cfg = {"out": str(out), "seed": source.get("seed", 0), "imbalance": source.get("imbalance", "none"),
           **({"level": level} if level != "slide" else {}),
           "rescore": {"run": str(run.resolve()), "tta": tta, "shards": str(shards), "mixed_precision": precision,
                       "chunk_regions": chunk_regions}}
    extra = {"title": f"{run.name} rescored with its fold models, tta={tta}", "rescored_from": str(run.resolve()),
             "tta": tta, "mixed_precision": precision}
    metrics = run_folds(regions.infos(), classes, fold_settings(cfg), accelerator, test_probs, extra,
                        folds=read_splits(run / "splits.csv"), config=cfg)
    total = {"seconds": round(sum(c["seconds"] for c in cost.values()), 3), "tiles": sum(c["tiles"] for c in cost.values())}
    total["tiles_per_s"] = round(total["tiles"] / total["seconds"], 1)
    if accelerator.is_main_process:
        atomic_write_json(out / "rescore.json", {"folds": cost, "total": total, **cfg["rescore"]})
    return {**metrics, "rescore": {"folds": cost, "total": total}}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("run", type=Path, help="a finished cross-validated run with fold model cards")
    parser.add_argument("--out", type=Path, required=True, help="output folder of the rescored run")
    parser.add_argument("--tta", choices=("none", "dihedral"), default="dihedral",
                        help="test-time augmentation: dihedral averages the 8 flips and rotations")
    parser.add_argument("--shards", help="region shards (folder or URL); default: the run's data.shards")
    parser.add_argument("--chunk-regions", type=int, default=16, help="regions per model call")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"),
                        help="default: the run's train.mixed_precision")
    parser.add_argument("--trusted", action="store_true", help="allow unpickling the cards' released .pth weights")
    args = parser.parse_args(argv)
    setup_logging()
    settings = RescoreSettings.from_mapping({"tta": args.tta, "shards": args.shards, "chunk_regions": args.chunk_regions,
                                             "mixed_precision": args.mixed_precision, "trusted": args.trusted})
    metrics = rescore(args.run, args.out, settings)
    summary, total = metrics["summary"]["balanced_accuracy"], metrics["rescore"]["total"]
    print(f"balanced accuracy {summary['mean']:.3f} +- {summary['sd']:.3f} (tta={args.tta}), "
          f"{total['tiles_per_s']:.1f} tiles/s -> {args.out / 'report.md'}")


if __name__ == "__main__":
    sys.exit(run_main(main))
