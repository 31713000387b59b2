"""Predict slides and show the evidence: `hipt-predict` / `accelerate launch recipes/predict.py`.

Slide files, image files or region shards -> predictions.csv (a row per slide: probabilities, or why it
failed; level=patient: a row per patient, one bag of all its slides' regions), a region-attention heatmap per
slide and tile-attention heatmaps of its top regions. Regions are read (the tiling of shard building) and
embedded `chunk_regions` at a time, so memory is bounded whatever the slide size. The model: a trained run's
fold models rebuilt from their cards (`--model RUN_DIR`; model.fold=all averages them), or the explicit
model.* keys.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import islice
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from hipt_e2e.config import HelpFormatter, Settings, bound, resolve_settings, save_config, section, setup_logging
from hipt_e2e.data.augment import Tta, tta_poses
from hipt_e2e.data.discovery import SlideFile, find_slides
from hipt_e2e.data.lineage import Geometry, check_geometry
from hipt_e2e.data.manifest import load_manifest
from hipt_e2e.data.masks import ROI_EXCLUDE, slide_roi
from hipt_e2e.data.regions import ShardRegions
from hipt_e2e.data.samples import device_pixels
from hipt_e2e.data.slides import Level, SlideInfo, units
from hipt_e2e.data.sources import (
    ImageReader,
    OpenSlideReader,
    check_resolution,
    iter_regions,
)
from hipt_e2e.data.storage import StorageSettings, configure
from hipt_e2e.data.streams import SlideBagStream
from hipt_e2e.data.tiling import MAX_INK, RegionGeometry
from hipt_e2e.errors import InputError, SettingError, run_main
from hipt_e2e.inference.geojson import slide_features
from hipt_e2e.inference.heatmaps import plot_region_heatmap, plot_tile_heatmap, region_score_map, top_regions
from hipt_e2e.inference.scoring import Member, SlideScore, score_slide
from hipt_e2e.io import atomic_write_text
from hipt_e2e.lineage import read_lineage
from hipt_e2e.models import HIPT, load_checkpoint, model_preset, select_attention
from hipt_e2e.models.bundle import CARD, load_bundle
from hipt_e2e.models.mil import RegionFC
from hipt_e2e.progress import progress
from hipt_e2e.runtime import Precision, make_accelerator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictModel(Settings):
    """The `model` section: a trained run's model cards, or the model named key by key."""

    # a trained run folder (its fold models' cards), one fold folder or a model_card.json: classes,
    # geometry, normalisation and weights come from the cards and the keys below (but trusted) are unused
    card: str | None = None
    fold: int | str = "all"  # with a run folder: all (mean of the fold models' probabilities), i, or a fold folder name
    preset: str = "hipt"  # geometry of the three levels (see hipt_e2e/models/presets.py)
    cnn: str | None = None  # a timm CNN name when the tile encoder is the CNN variant
    classes: tuple[str, ...] | None = None  # class names in the order of the model's outputs
    normalisation: str = "hipt"
    head: Literal["slide", "fc"] = "slide"  # slide: slide model over all regions; fc: per-region FC + vote
    vote: Literal["majority", "mean"] = "majority"
    fc_hidden: int | None = bound(None, 1)  # hidden width of the FC, as trained (train_fc's model.hidden)
    weights: str | None = None  # one safetensors file of the whole HIPT (end-to-end runs)
    tile_encoder: str | None = None  # or per stage (staged runs): DINO exports and the slide model / FC
    region_encoder: str | None = None
    slide_model: str | None = None
    trusted: bool = False  # allow full unpickling of released .pth files (only for files you trust)


@dataclass(frozen=True)
class PredictGeometry(Settings):
    """The `geometry` section: how slides are read, as hipt-shards build reads them (--slide-mpp,
    --allow-upsample, ...)."""

    region_px: int | None = bound(None, 1)  # null: the preset's (tile_px x region_tiles)
    mpp: float = bound(0.5, 0.0)
    slide_mpp: float | None = bound(None, 0.0)  # inputs' resolution when their metadata has none or an implausible one
    min_tissue: float = bound(0.25, 0.0, 1.0)
    tissue_threshold: int | None = bound(None, 0, 255)  # saturation 0-255; null: Otsu per slide (floored)
    max_ink: float = bound(MAX_INK, 0.0, 1.0)  # most ink (blue, green, black marker) a scored tile or region holds
    roi: str | None = None  # folder of QuPath GeoJSON annotations, <slide_id>.geojson, restricting the regions read
    roi_exclude: tuple[str, ...] = ROI_EXCLUDE  # annotation classes cut out of the ROI; all others include
    allow_upsample: bool = False  # allow reading at an mpp finer than a slide's own by more than 1.25x


@dataclass(frozen=True)
class PredictSettings(Settings):
    """hipt-predict's settings (data: the storage settings of shard inputs read by URL)."""

    model: PredictModel = section(PredictModel)
    input_kind: Literal["slides", "images", "shards"] = "slides"
    level: Level = "slide"  # patient: a row per patient from one bag of its slides' regions (heatmaps per slide)
    # level=patient with slide or image files: CSV slide_id,patient_id (a labels CSV will do); an unlisted
    # slide is its own patient (as shard building makes it); shards record their slides' patients
    patients: str | None = None
    geometry: PredictGeometry = section(PredictGeometry)
    chunk_regions: int = bound(8, 1)  # regions read, embedded and held at a time (the next chunk is read meanwhile)
    mixed_precision: Precision = None  # no | bf16 | fp16; null: as `accelerate launch` says
    top_regions: int = bound(3, 0)
    tta: Tta = "none"  # none | dihedral: every region scored in its 8 poses, the slide's outputs averaged
    thumbnail_px: int = bound(1024, 1)
    out: str | None = None
    data: StorageSettings = section(StorageSettings)


@dataclass
class SlidePrediction(SlideScore):
    """A slide's score (with its tile attention) and where its regions are."""
    coords: np.ndarray  # [M, 2] level-0 x, y
    size: int  # region side in level-0 pixels


class Predictor:
    """Trained models (members: fold models, averaged) applied slide by slide through the slide scorer;
    geometry: where the members were trained (from their cards); None: the caller's."""

    def __init__(self, members: Sequence[Member], classes: Sequence[str],
                 vote_method: str = "majority", chunk_regions: int = 8, geometry: RegionGeometry | None = None,
                 tta: str = "none"):
        self.members = [(model.eval(), fc.eval() if fc is not None else None) for model, fc in members]
        self.classes, self.vote_method, self.chunk_regions, self.geometry = list(classes), vote_method, chunk_regions, geometry
        self.poses = tta_poses(tta)
        self.device, self.autocast = torch.device("cpu"), contextlib.nullcontext

    def to(self, accelerator: Accelerator) -> Predictor:
        """Run the members on the accelerator's device under its mixed precision (and the attention path
        that suits both, `select_attention`)."""
        device = accelerator.device
        self.members = [(select_attention(model.to(device), device, accelerator.mixed_precision),
                         fc.to(device) if fc is not None else None) for model, fc in self.members]
        self.device, self.autocast = device, accelerator.autocast
        return self

    def score(self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
              return_attention: bool = False) -> SlideScore:
        """One slide from chunks of its regions on the device, (pixels, tile mask or None), as score_slide."""
        return score_slide(self.members, chunks, self.poses, self.autocast, self.vote_method, return_attention)

    def predict(self, regions: Iterable[tuple[int, int, np.ndarray]], size: int) -> SlidePrediction:
        """regions: (x, y, rgb [H, W, 3]) of one slide, consumed `chunk_regions` at a time. With test-time
        augmentation every member scores the slide once per pose (every region in that pose, its tile grid
        turning with it); probabilities, region scores and (turned back) tile attention are averaged."""
        return self.predict_bag([(regions, size)])[0]

    def predict_bag(self, slides: Sequence[tuple[Iterable[tuple[int, int, np.ndarray]], int]]) -> list[SlidePrediction]:
        """One bag of the regions of `slides` ((regions, size) each, as `predict` takes them; a patient's),
        scored once; per slide its part of the bag (coords, region scores, tile attention) with the bag's
        probabilities."""
        coords: list[tuple[int, int]] = []
        ends: list[int] = []

        def chunks() -> Iterator[tuple[torch.Tensor, None]]:
            for regions, _ in slides:
                regions_left = iter(regions)
                while chunk := list(islice(regions_left, self.chunk_regions)):
                    coords.extend((x, y) for x, y, _ in chunk)
                    pixels = torch.stack([torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1) for *_, rgb in chunk])
                    yield device_pixels(pixels, self.device), None
                ends.append(len(coords))

        scored = self.score(chunks(), return_attention=True)
        return [SlidePrediction(scored.probs, scored.scores[start:end], scored.tile_attention[start:end],
                                np.array(coords[start:end]), size)
                for start, end, (_, size) in zip([0, *ends], ends, slides)]


def card_paths(source: str | Path, fold: str | int = "all") -> list[Path]:
    """The model cards named by model.card: a card file, a folder with one (a fold), or a run folder whose
    fold folders hold them (fold=all: every one; an index: that fold of the first repeat; or a folder name)."""
    source = Path(source)
    if source.is_file() or (source / CARD).is_file():
        return [source]
    cards = sorted(source.glob(f"*fold_*/{CARD}"), key=lambda p: (p.parent.name.startswith("repeat"), p.parent.name))
    if not cards:
        raise FileNotFoundError(f"{source}: no {CARD} and no fold folders holding one (fold_*/{CARD}); give a run "
                                "folder of e2e, train_wsi or train_fc, or name the weights with the model.* keys")
    if str(fold) == "all":
        return cards
    name = f"fold_{fold}" if str(fold).isdigit() else str(fold)
    chosen = [card for card in cards if card.parent.name == name]
    if not chosen:
        raise SettingError(f"model.fold={fold}: {source} has {', '.join(c.parent.name for c in cards)}")
    return chosen


def predictor_from_cards(settings: PredictSettings) -> Predictor:
    """The fold models named by model.card / model.fold, rebuilt from their cards (load_bundle)."""
    spec = settings.model
    bundles = [load_bundle(path, trusted=spec.trusted) for path in card_paths(spec.card, spec.fold)]
    first = bundles[0].card
    for bundle in bundles[1:]:
        if [bundle.classes, bundle.card["tile_px"], bundle.card["region_px"]] != [bundles[0].classes, first["tile_px"],
                                                                                  first["region_px"]]:
            raise SettingError(f"{spec.card}: its fold models differ in classes or geometry; pick one with model.fold")
    geometry = RegionGeometry(first["region_px"], first["tile_px"], first.get("mpp") or settings.geometry.mpp)
    log.info("%d model(s) from %s: %s, classes %s, %d px regions of %d px tiles at %s um/px", len(bundles), spec.card,
             first["source"], bundles[0].classes, geometry.region_px, geometry.tile_px, geometry.mpp)
    return Predictor([(b.model, b.fc) for b in bundles], bundles[0].classes, bundles[0].vote, settings.chunk_regions,
                     geometry, settings.tta)


def build_predictor(settings: PredictSettings) -> Predictor:
    """The model named by the `model:` section (model.card, or the explicit keys), loaded without unpickling
    unless `trusted`."""
    spec = settings.model
    if spec.card:
        return predictor_from_cards(settings)
    if not spec.classes:
        raise SettingError("model.classes must list the class names in the model's output order")
    classes = list(spec.classes)
    model = HIPT.from_preset(spec.preset, len(classes), cnn=spec.cnn, normalisation=spec.normalisation)
    fc = None
    if spec.head == "fc":
        fc = RegionFC(len(classes), dim=model_preset(spec.preset)["slide"]["dim"], hidden=spec.fc_hidden).eval()
    if spec.weights:
        load_checkpoint(model, spec.weights, trusted=spec.trusted, strict=True)
    for weights, module in ((spec.tile_encoder, model.tile_encoder), (spec.region_encoder, model.region_encoder),
                            (spec.slide_model, fc if fc is not None else model.slide_model)):
        if weights:
            load_checkpoint(module, weights, trusted=spec.trusted, strict=True)
    if not spec.weights and not all((spec.tile_encoder, spec.region_encoder, spec.slide_model)):
        raise SettingError("give model.weights (a whole HIPT) or all of model.tile_encoder, model.region_encoder "
                         "and model.slide_model")
    return Predictor([(model, fc)], classes, spec.vote, settings.chunk_regions, tta=settings.tta)


@dataclass
class SlideInput:
    slide_id: str
    path: Path | str  # a slide file, or the shard set (folder or URL) it came from
    regions: Iterator[tuple[int, int, np.ndarray]]
    size: int
    thumbnail: np.ndarray
    thumb_scale: float  # thumbnail pixels per level-0 pixel
    read: Any  # (x, y) -> region rgb, for the tile heatmaps of the top regions
    close: Any = None
    dimensions: tuple[int, int] | None = None  # level-0 width, height (None: unknown, e.g. from shards)


def _reader_inputs(slides: Sequence[SlideFile], settings: PredictSettings, geometry: RegionGeometry
                   ) -> Iterator[SlideInput | tuple]:
    opener = ImageReader if settings.input_kind == "images" else OpenSlideReader
    g = settings.geometry
    for slide in slides:
        path = slide.path
        try:
            reader = opener(path, g.slide_mpp)
            check_resolution(reader, geometry, g.allow_upsample)  # now, so a bad slide is listed before reading
            roi = None if g.roi is None else slide_roi(Path(g.roi), slide.slide_id, g.roi_exclude)
            regions = iter_regions(reader, geometry, min_tissue=g.min_tissue, threshold=g.tissue_threshold,
                                   max_ink=g.max_ink, roi=roi, allow_upsample=g.allow_upsample)
            size = geometry.level0_size(reader.mpp) if reader.mpp else 0
            thumbnail = reader.thumbnail(settings.thumbnail_px)
            yield SlideInput(slide.slide_id, path, ((r.x, r.y, r.rgb) for r in regions), size, thumbnail,
                             thumbnail.shape[1] / reader.width,
                             lambda x, y, reader=reader, size=size: reader.read(x, y, size, geometry.region_px),
                             reader.close, (reader.width, reader.height))
        except Exception as exc:  # one unreadable slide must not stop the run
            yield (slide, f"{type(exc).__name__}: {exc}")


Unit = tuple[str | None, Iterable]  # (its patient at level=patient, else None; its slides' inputs)


def _file_units(found: Sequence[SlideFile], settings: PredictSettings) -> list[tuple[str | None, list[SlideFile]]]:
    """The units of slide or image files: each slide alone, or each patient's slides (settings.patients)."""
    if settings.level == "slide":
        return [(None, [slide]) for slide in found]
    if not settings.patients:
        raise SettingError("level=patient with slide or image files needs patients=CSV (columns slide_id, patient_id)")
    patients, by_id = read_patients(settings.patients), {slide.slide_id: slide for slide in found}
    infos = [SlideInfo(slide.slide_id, "", patients.get(slide.slide_id, slide.slide_id)) for slide in found]
    return [(unit.patient_id, [by_id[s] for s in slides]) for unit, slides in units(infos, "patient", settings.patients).items()]


def read_patients(path: str | Path) -> dict[str, str]:
    """slide id -> patient id, from a CSV with the columns slide_id and patient_id (a labels CSV)."""
    with open(path, newline="") as handle:
        rows = csv.DictReader(handle)
        if not {"slide_id", "patient_id"} <= set(rows.fieldnames or ()):
            raise InputError(path, "needs the columns slide_id and patient_id (a labels CSV with patient_id will do)")
        return {row["slide_id"].strip(): row["patient_id"].strip() for row in rows if (row["patient_id"] or "").strip()}


def _shard_units(root: str, settings: PredictSettings) -> Iterator[Unit]:
    """The units of a region-shard set (a folder or URL), all of them in every process (predict_inputs splits
    them): each slide as the stream reads it, or each patient's slides read by id when its process uses them."""
    if settings.level == "slide":
        yield from ((None, [_shard_input(bag, root, settings)]) for bag in SlideBagStream(root, rank=0, world_size=1))
        return
    regions = ShardRegions(root, regions_per_slide=None, seed=0)
    for unit, slides in units(regions.infos(), "patient", root).items():
        yield unit.patient_id, (_shard_input(regions[s, range(len(regions.slides[s]))], root, settings) for s in slides)


def _shard_input(bag: dict, root: str, settings: PredictSettings) -> SlideInput:
    """A slide of region shards (a SlideBagStream bag); the thumbnail is a mosaic of its regions at their
    coordinates."""
    coords = bag["coords"].numpy()
    rgb = bag["pixels"].permute(0, 2, 3, 1).numpy()
    size = int(rgb.shape[1])
    width, height = coords[:, 0].max() + size, coords[:, 1].max() + size
    scale = min(1.0, settings.thumbnail_px / max(width, height))
    canvas = np.full((int(height * scale) + 1, int(width * scale) + 1, 3), 255, dtype=np.uint8)
    step = max(1, int(round(1 / scale)))
    for (x, y), region in zip(coords, rgb):
        small = region[::step, ::step]
        x0, y0 = int(x * scale), int(y * scale)
        canvas[y0: y0 + small.shape[0], x0: x0 + small.shape[1]] = small[: canvas.shape[0] - y0, : canvas.shape[1] - x0]
    by_xy = {(int(x), int(y)): region for (x, y), region in zip(coords, rgb)}
    return SlideInput(bag["slide_id"], root, ((int(x), int(y), r) for (x, y), r in zip(coords, rgb)), size,
                      canvas, scale, lambda x, y, by_xy=by_xy: by_xy[(int(x), int(y))])


def _heatmaps(out: Path, slide: SlideInput, result: SlidePrediction, classes: Sequence[str], top: int) -> None:
    predicted = classes[int(np.argmax(result.probs))]
    title = f"{slide.slide_id}: {predicted} (p={result.probs.max():.2f})"
    heat = region_score_map(slide.thumbnail.shape[:2], slide.thumb_scale, result.coords, result.size, result.scores)
    plot_region_heatmap(out / f"{slide.slide_id}_regions.png", slide.thumbnail, heat, title)
    chosen = top_regions(result.scores, top)
    atomic_write_text(out / f"{slide.slide_id}.geojson", json.dumps(slide_features(
        result.coords, result.size, result.scores, result.tile_attention, result.probs, classes, chosen,
        slide.dimensions)))
    for rank, index in enumerate(chosen):
        x, y = result.coords[index]
        plot_tile_heatmap(out / f"{slide.slide_id}_tiles_top{rank + 1}.png", slide.read(x, y),
                          result.tile_attention[index], f"{title}\nregion {rank + 1} at ({x}, {y})")


def prefetch(items: Iterable, ahead: int) -> Iterator:
    """The items of `items`, produced by a background thread at most `ahead` items in advance: reading and
    decoding the next regions (OpenSlide and Pillow release the GIL) overlaps the model, and memory stays
    bounded. An error in the thread is raised here; a consumer that stops early stops the thread."""
    queue: Queue = Queue(maxsize=max(1, ahead))
    done, stop = object(), threading.Event()

    def produce() -> None:  # (item, None) ..., then (done, the error or None)
        try:
            for item in items:
                if stop.is_set():
                    return
                queue.put((item, None))
            queue.put((done, None))
        except BaseException as error:  # handed to the consumer
            queue.put((done, error))

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while (entry := queue.get())[0] is not done:
            yield entry[0]
        if entry[1] is not None:
            raise entry[1]
    finally:
        stop.set()
        while thread.is_alive():  # a slide is closed only after its reader thread has let go of it
            with contextlib.suppress(Empty):
                queue.get(timeout=0.1)  # frees a producer waiting to put


def _slide_regions(slide: SlideInput, ahead: int, show: bool) -> Iterator[tuple[int, int, np.ndarray]]:
    """A slide's regions, read by a background thread (prefetch); closing this stops the thread."""
    regions = prefetch(slide.regions, ahead)
    try:
        yield from progress(regions, desc=slide.slide_id, unit="region", leave=False, disable=not show)
    finally:
        regions.close()


def _prediction_row(unit: Unit, predictor: Predictor, out: Path, top_regions: int, show: bool) -> list:
    """One predictions.csv row: the unit's slides (one, or a patient's) scored as one bag (their heatmaps
    written), or why it failed; a slide that could not be opened comes as an (unread input, error) pair.
    A patient's row starts with its id."""
    classes, (patient, entries) = predictor.classes, unit
    entries = list(entries)
    slides = [entry[0] if isinstance(entry, tuple) else entry for entry in entries]
    opened = [entry for entry in entries if not isinstance(entry, tuple)]
    error = "; ".join(f"{entry[0].slide_id}: {entry[1]}" if len(entries) > 1 else entry[1]
                      for entry in entries if isinstance(entry, tuple))
    n_regions, probs = 0, None
    streams = [_slide_regions(slide, predictor.chunk_regions, show) for slide in opened]
    try:
        if not error:
            results = predictor.predict_bag([(stream, slide.size) for stream, slide in zip(streams, opened)])
            for slide, result in zip(opened, results):
                _heatmaps(out / "heatmaps", slide, result, classes, top_regions)
            n_regions, probs = sum(len(result.coords) for result in results), results[0].probs
    except Exception as exc:
        n_regions, probs, error = 0, None, f"{type(exc).__name__}: {exc}"
    finally:
        for stream in streams:  # before its slide closes: a reader thread must let go of it first
            stream.close()
        for slide in opened:
            if slide.close:
                slide.close()
    path = ";".join(dict.fromkeys(str(slide.path) for slide in slides))  # shards: their one root
    if error:
        log.warning("failed %s: %s", path, error)
    return [*([patient] if patient is not None else []), ";".join(slide.slide_id for slide in slides), path,
            "failed" if error else "ok", error, n_regions,
            *([f"{p:.6f}" for p in probs] if probs is not None else [""] * len(classes)),
            classes[int(np.argmax(probs))] if probs is not None else ""]


def _write_predictions(path: Path, rows: Sequence[list], classes: Sequence[str], level: Level) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow([*(["patient_id"] if level == "patient" else []), "slide_id", "path", "status", "error",
                     "n_regions", *[f"prob_{c}" for c in classes], "predicted"])
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


def predict_inputs(settings: PredictSettings, inputs: Sequence[str | Path], predictor: Predictor | None = None) -> int:
    """Predict every input slide (level=patient: patient), split over the processes; the main process writes
    one predictions.csv in input order. Returns the number that failed (each listed there)."""
    # found first, so that an input holding no slides (or a shard set) is refused before anything is written
    files = [] if settings.input_kind == "shards" else _file_units(find_slides(inputs, settings.input_kind), settings)
    accelerator = make_accelerator(settings.mixed_precision)
    predictor = (predictor or build_predictor(settings)).to(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    preset = model_preset(settings.model.preset)
    region_px = settings.geometry.region_px or preset["tile_px"] * preset["region_tiles"]
    geometry = predictor.geometry or RegionGeometry(region_px, preset["tile_px"], settings.geometry.mpp)
    if settings.input_kind == "shards":  # slides are read at the model's geometry; shards hold theirs
        for root in inputs:
            check_geometry(read_lineage(root).geometry, root, Geometry.of_regions(geometry),
                           settings.model.card or "model.* and geometry.* settings")
    out = Path(settings.out)
    if accelerator.is_main_process:
        (out / "heatmaps").mkdir(parents=True, exist_ok=True)
        save_config(settings, out)
    accelerator.wait_for_everyone()
    if settings.input_kind == "shards":
        every: Iterable = (unit for root in inputs for unit in _shard_units(str(root), settings))
        mine: Iterable = (unit for n, unit in enumerate(every) if n % world == rank)
        total = sum(len({entry["patient_id"] if settings.level == "patient" else slide
                         for slide, entry in load_manifest(root)["slides"].items()}) for root in inputs)
    else:
        mine = ((patient, _reader_inputs(slides, settings, geometry)) for patient, slides in files[rank::world])
        total = len(files)
    show = accelerator.is_local_main_process
    rows = [_prediction_row(unit, predictor, out, settings.top_regions, show) for unit in progress(
        mine, total=len(range(rank, total, world)), desc="predict", unit=settings.level, disable=not show)]
    # process r predicted inputs r, r + N, ...: interleave the parts back into input order
    parts = gather_object([rows])
    rows = [part[n] for n in range(max(map(len, parts))) for part in parts if n < len(part)]
    failed = sum(row[3 if settings.level == "patient" else 2] == "failed" for row in rows)  # the status column
    if accelerator.is_main_process:
        _write_predictions(out / "predictions.csv", rows, predictor.classes, settings.level)
        log.info("%d %ss: %d predicted, %d failed -> %s", len(rows), settings.level, len(rows) - failed, failed,
                 out / "predictions.csv")
    accelerator.end_training()  # tear the process group down before exit (a live one can abort a process)
    return failed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hipt-predict", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("inputs", nargs="+", help="slide/image files or folders, or shard folders; then key=value "
                                                  "settings, e.g. out=DIR model.fold=all")
    parser.add_argument("--config", type=Path, default=None, help="YAML file of settings over the built-in defaults")
    parser.add_argument("--model", type=Path, default=None,
                        help="a trained run folder, fold folder or model_card.json (same as model.card=...)")
    args = parser.parse_intermixed_args(argv)  # flags may come between the inputs and the key=value settings
    setup_logging()
    overrides = [a for a in args.inputs if "=" in a] + ([f"model.card={args.model}"] if args.model else [])
    settings = resolve_settings(PredictSettings, args.config, overrides)
    configure(settings.data.retry_budget_s, settings.data.storage_options)
    if not settings.out:
        parser.error("set out=DIR (in the --config file or as key=value)")
    failed = predict_inputs(settings, [a for a in args.inputs if "=" not in a])
    return min(failed, 125)  # the exit code says how many slides (patients) failed, capped for the shell


cli = partial(run_main, main)  # the hipt-predict console script: user errors as one line

if __name__ == "__main__":
    sys.exit(cli())
