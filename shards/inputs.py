"""Finding the inputs of a build and their labels.

An item is one unit of work: a slide (file, DICOM series, or folder of region `.pt` files) or a group of
`.pt` tiles of a flat folder. Items are sorted by slide id, then put in a seeded order, so their ordinals
(and sample keys) are the same on every machine for `--part i/n` and resuming. The shuffle matters: ids
follow the class, and shards in that order would each hold one class, as would a stream's batches.
"""
from __future__ import annotations

import csv
import random
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from hipt_e2e.data.discovery import SlideFile, check_unique_ids, find_slides
from hipt_e2e.data.sources import InputError
from hipt_e2e.errors import SettingError, UserError

InputKind = Literal["pt", "images", "slides"]  # what a build's input folder holds
KINDS: tuple[str, ...] = typing.get_args(InputKind)
FEATURES = "features"  # a folder of tile-feature files, one .h5 per slide (shards/features.py)


@dataclass
class Item:
    ordinal: int
    slide_id: str | None  # None for a group of unlabelled tiles
    path: Path
    label: str | None = None
    patient_id: str | None = None
    split: str | None = None
    files: tuple[Path, ...] = ()  # the .pt files of a pt item

    @property
    def n_inputs(self) -> int:  # its files for `pt`, else the one slide
        return len(self.files) if self.files else 1


class LabelsError(UserError, ValueError):
    """All problems of a labels CSV against the inputs found, reported together."""


def read_labels_csv(path: Path) -> tuple[dict[str, dict], list[str]]:
    """`slide_id,label[,patient_id][,split]` -> ({slide_id: row}, problems)."""
    problems: list[str] = []
    rows: dict[str, dict] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing_columns = {"slide_id", "label"} - set(reader.fieldnames or [])
        if missing_columns:
            raise LabelsError(f"{path}: missing column(s) {sorted(missing_columns)}; "
                              "expected slide_id,label[,patient_id][,split]")
        for line, row in enumerate(reader, start=2):
            slide_id = (row.get("slide_id") or "").strip()
            if not slide_id:
                problems.append(f"{path}:{line}: empty slide_id")
                continue
            if slide_id in rows:
                problems.append(f"{path}:{line}: duplicate slide id {slide_id!r}")
                continue
            label = (row.get("label") or "").strip()
            if not label:
                problems.append(f"{path}:{line}: slide {slide_id!r} has no label")
            rows[slide_id] = {"label": label or None,
                              "patient_id": (row.get("patient_id") or "").strip() or None,
                              "split": (row.get("split") or "").strip() or None}
    return rows, problems


def _find_pt(root: Path) -> tuple[list[Path], bool]:
    """The .pt inputs under root: flat tiles (True) or one sub-folder of region tensors per slide (False)."""
    flat = sorted(root.glob("*.pt"))
    folders = sorted({p.parent for p in root.rglob("*.pt") if p.parent != root})
    if flat and folders:
        raise InputError(root, "holds both .pt files and sub-folders of .pt files; use either a flat "
                               "folder of tiles or one sub-folder per slide")
    if not flat and not folders:
        raise InputError(root, "holds no .pt files (looked for *.pt and */*.pt)")
    return (flat, True) if flat else (folders, False)


def discover(kind: str, root: str | Path, *, labels_csv: str | Path | None = None,
             labels_from_folders: bool = False, tiles_per_item: int = 1024,
             shuffle_seed: int | None = 0) -> list[Item]:
    """All items of a build, numbered in their build order; label problems raise one LabelsError listing all."""
    if kind not in (*KINDS, FEATURES):
        raise SettingError(f"unknown kind {kind!r}; choose one of {(*KINDS, FEATURES)}")
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "input folder not found")
    if kind == "pt":
        paths, flat_tiles = _find_pt(root)
        if flat_tiles:
            paths = _build_order(paths, shuffle_seed)
            groups = [paths[i: i + tiles_per_item] for i in range(0, len(paths), tiles_per_item)]
            return [Item(n, None, group[0], files=tuple(group)) for n, group in enumerate(groups)]
        slides = [SlideFile(path.name, path, path.parent) for path in paths]
        check_unique_ids(slides)
    elif kind == FEATURES:
        slides = [SlideFile(path.stem, path, path.parent) for path in sorted(root.rglob("*.h5"))]
        if not slides:
            raise InputError(root, "holds no .h5 feature files")
        check_unique_ids(slides)
    else:
        slides = find_slides([root], kind)
    by_id = {slide.slide_id: slide.path for slide in slides}
    problems: list[str] = []
    labels: dict[str, dict] = {}
    if labels_csv is not None:
        labels, csv_problems = read_labels_csv(Path(labels_csv))
        problems += csv_problems
        problems += [f"{labels_csv}: slide {s!r} is listed but not found under {root}"
                     for s in sorted(set(labels) - set(by_id))]
        problems += [f"{by_id[s]}: slide {s!r} is not in {labels_csv}" for s in sorted(set(by_id) - set(labels))]
    elif labels_from_folders:
        labels = {s.slide_id: {"label": s.folder.name, "patient_id": None, "split": None} for s in slides}
    if problems:
        raise LabelsError(f"{len(problems)} problem(s) with the inputs and labels:\n  " + "\n  ".join(problems))
    items = []
    for ordinal, slide_id in enumerate(_build_order(sorted(by_id), shuffle_seed)):
        path = by_id[slide_id]
        row = labels.get(slide_id, {})
        files = tuple(sorted(path.glob("*.pt"))) if kind == "pt" else ()
        items.append(Item(ordinal, slide_id, path, row.get("label"), row.get("patient_id"), row.get("split"), files))
    return items


def _build_order(names: list, seed: int | None) -> list:
    """`names` (sorted) in a random order fixed by `seed`; None keeps them sorted."""
    if seed is None:
        return names
    shuffled = list(names)
    random.Random(seed).shuffle(shuffled)
    return shuffled


def class_names(items: list[Item], classes: list[str] | None = None) -> list[str]:
    """The class list: given explicitly, or the sorted labels found. A label outside a given list is an error."""
    found = sorted({item.label for item in items if item.label is not None})
    if classes is None:
        return found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise LabelsError(f"label(s) {unknown} are not in the class list {classes}")
    return list(classes)
