"""Frozen-feature checks of a tile encoder on labelled images: k-NN and linear-probe accuracy (stratified
k-fold) of a run's teacher backbone and of the same encoder at random initialisation, against 48-bin colour
histograms, the baseline a model must beat to show it learned more than stain colour. Writes RUN/knn.json.

    python -m hipt_e2e.evaluation.knn --run runs/lymphoma_dino --images ../shared/data/lymphoma-iicbu2008
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.base import ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from torch import nn

from hipt_e2e.config import HelpFormatter, load_yaml, setup_logging
from hipt_e2e.data.sources import IMAGE_SUFFIXES
from hipt_e2e.errors import run_main
from hipt_e2e.io import atomic_write_json
from hipt_e2e.models import token_grids
from hipt_e2e.models.encoders import BACKBONE_EXPORT, TileModel, WeightsFile, build_tile_encoder, load_encoder_weights
from hipt_e2e.progress import progress

log = logging.getLogger(__name__)

HISTOGRAM_BINS = 16  # per channel, 48 in all


def labelled_image_paths(root: str | Path) -> tuple[list[Path], list[str]]:
    """Images in one folder per class -> (paths, class by class then name order; class names)."""
    classes = sorted(p.name for p in Path(root).iterdir() if p.is_dir())
    paths = [path for name in classes
             for path in sorted(p for p in (Path(root) / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)]
    return paths, classes


def load_rgb(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


def cross_validated_accuracy(features: np.ndarray, labels: np.ndarray, classifier: Callable[[], ClassifierMixin],
                             folds: int = 5, seed: int = 0) -> tuple[float, float]:
    """(mean, sd) over stratified folds of a fresh classifier's test accuracy."""
    accuracies = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        model = classifier().fit(features[train], labels[train])
        accuracies.append(float((model.predict(features[test]) == labels[test]).mean()))
    return float(np.mean(accuracies)), float(np.std(accuracies))


def knn_classifier(k: int = 20) -> ClassifierMixin:
    """Cosine k-NN on L2-normalised features, neighbours weighted by similarity (as DINO evaluates)."""
    return make_pipeline(Normalizer(), KNeighborsClassifier(n_neighbors=k, weights="distance"))


def linear_probe(C: float = 1.0, class_weight: str | None = None) -> ClassifierMixin:  # noqa: N803 (sklearn's name)
    return make_pipeline(StandardScaler(), LogisticRegression(C=C, class_weight=class_weight, max_iter=5000))


def colour_histograms(images: Sequence[torch.Tensor]) -> np.ndarray:
    """uint8 [3, H, W] images -> [N, 48]: a 16-bin histogram per RGB channel, as pixel fractions."""
    edges = torch.linspace(0, 256, HISTOGRAM_BINS + 1)
    return np.stack([np.concatenate([torch.histogram(channel.float(), bins=edges)[0].numpy() / channel.numel()
                                     for channel in image]) for image in images])


@torch.no_grad()
def image_features(encoder: nn.Module, images: Sequence[torch.Tensor], tile_px: int, normalisation: str,
                   tiles_per_call: int = 256) -> np.ndarray:
    """uint8 [3, H, W] images -> [N, D]: each image's mean tile embedding (whole tiles from the top-left)."""
    encoder.eval()
    features = []
    for image in progress(images, desc="image features", unit="image"):
        rows, cols = image.shape[1] // tile_px, image.shape[2] // tile_px
        grid = token_grids(encoder, image[None, :, :rows * tile_px, :cols * tile_px], tile_px, normalisation,
                           tiles_per_call)
        features.append(grid.mean(dim=(2, 3))[0].numpy())
    return np.stack(features)


def evaluate_run(run: str | Path, images_root: str | Path, tile_px: int, k: int = 20, folds: int = 5,
                 seed: int = 0, weights: str | Path | None = None) -> dict:
    """The checks of a pretraining run's teacher backbone (``weights``, default its backbone.safetensors),
    written to RUN/knn.json."""
    run = Path(run)
    weights = Path(weights) if weights is not None else run / BACKBONE_EXPORT
    cfg = load_yaml((run / "config.yaml").read_text())
    paths, classes = labelled_image_paths(images_root)
    images, labels = [load_rgb(p) for p in paths], np.array([classes.index(p.parent.name) for p in paths])
    log.info("%d images in %d classes %s", len(images), len(classes), classes)
    results = {"weights": str(weights), "images": len(images), "classes": classes, "folds": folds, "k": k,
               "tile_px": tile_px}
    torch.manual_seed(seed)
    model = TileModel.from_mapping(cfg["model"])
    encoders = {"random_init": build_tile_encoder(model),
                "dino": load_encoder_weights(build_tile_encoder(model), WeightsFile(str(weights)))}
    features = {"colour_histogram": colour_histograms(images)} | {
        name: image_features(encoder, images, tile_px, cfg["data"]["normalisation"]) for name, encoder in encoders.items()}
    for name, values in features.items():
        results[name] = {"knn": cross_validated_accuracy(values, labels, lambda: knn_classifier(k), folds, seed),
                         "linear_probe": cross_validated_accuracy(values, labels, linear_probe, folds, seed)}
    atomic_write_json(run / "knn.json", results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a pretrain_vit256 output folder")
    parser.add_argument("--images", type=Path, required=True, help="one folder of images per class")
    parser.add_argument("--tile-px", type=int, required=True, help="tile size, as in the pretraining shards")
    parser.add_argument("--weights", type=Path, default=None, help="default: RUN/backbone.safetensors")
    parser.add_argument("--k", type=int, default=20, help="neighbours of the k-NN classifier")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the folds")
    args = parser.parse_args(argv)
    setup_logging()
    results = evaluate_run(args.run, args.images, args.tile_px, args.k, args.folds, args.seed, args.weights)
    for name in ("colour_histogram", "random_init", "dino"):
        log.info("%s: k-NN %.3f +- %.3f, linear probe %.3f +- %.3f", name, *results[name]["knn"],
                 *results[name]["linear_probe"])


if __name__ == "__main__":
    sys.exit(run_main(main))
