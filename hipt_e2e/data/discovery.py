"""Finding the slides among the inputs, one rule for `hipt-shards build` and `hipt-predict` alike.

A slide is one file or one DICOM series (`.dcm` files in one folder, opened from one of its VOLUME files). Its
id: a file's name without the suffix (`.ome.tiff` counts as one); a DICOM series' folder name when that folder
holds no other series, else its SeriesInstanceUID. Its folder (for `--labels-from-folders`): the file's, or
the one above a one-series DICOM folder (`<class>/<slide>/*.dcm`).
"""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hipt_e2e.data.dicom import WSI_SOP_CLASS, DicomHeader, read_dicom_header
from hipt_e2e.data.manifest import FORMAT, MANIFEST
from hipt_e2e.data.sources import IMAGE_SUFFIXES, SLIDE_SUFFIXES, InputError
from hipt_e2e.errors import SettingError

log = logging.getLogger(__name__)

MULTI_SUFFIXES = (".ome.tiff", ".ome.tif")  # one suffix to the slide id rule, however many dots
DICOM_SUFFIX = ".dcm"
SUFFIXES = {"slides": SLIDE_SUFFIXES, "images": IMAGE_SUFFIXES}


@dataclass(frozen=True)
class SlideFile:
    slide_id: str
    path: Path  # the file to open (for a DICOM series: one of its VOLUME files; OpenSlide finds the rest)
    folder: Path  # the folder holding the slide, whose name is its class under --labels-from-folders


def slide_id_of_file(path: Path) -> str:
    lower = path.name.lower()
    for suffix in MULTI_SUFFIXES:
        if lower.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def find_slides(inputs: Iterable[str | Path], kind: str = "slides") -> list[SlideFile]:
    """The slides of `inputs` (files, or folders searched recursively for `kind`: slides or images) in input
    order, each folder's sorted. InputError for an input missing, holding a shard set or no slide, and for
    two slides with one id."""
    if kind not in SUFFIXES:
        raise SettingError(f"input kind {kind!r}: slides are found for {' or '.join(SUFFIXES)}")
    slides: list[SlideFile] = []
    seen: set[SlideFile] = set()
    series: dict[Path, list] = {}  # each DICOM folder's series, read once however many of its files are given
    for item in map(Path, inputs):
        if item.is_dir():
            found = _slides_in_folder(item, kind, series)
        elif item.is_file():
            found = _slides_of_files([item], series)
        else:
            raise InputError(item, "not found")
        if not found:
            raise InputError(item, f"holds no {kind} (looked for {', '.join(SUFFIXES[kind])}"
                                   f"{'; a DICOM series needs a VOLUME image' if kind == 'slides' else ''})")
        slides += [slide for slide in found if slide not in seen]
        seen.update(found)
    check_unique_ids(slides)
    return slides


def check_unique_ids(slides: Sequence[SlideFile]) -> None:
    """InputError naming the first two slides that share an id (ids key labels, shards and outputs)."""
    first: dict[str, Path] = {}
    for slide in slides:
        if slide.slide_id in first:
            raise InputError(slide.path, f"has slide id {slide.slide_id!r}, as does {first[slide.slide_id]}; "
                                         "slide ids must be unique (rename one)")
        first[slide.slide_id] = slide.path


def _slides_in_folder(folder: Path, kind: str, series: dict[Path, list]) -> list[SlideFile]:
    if _is_shard_set(folder):
        raise InputError(folder, f"holds a shard set ({MANIFEST} of `hipt-shards build` or an embedding recipe), "
                                 "not slide or image files: read it as shards (hipt-predict ... input_kind=shards, "
                                 "a recipe's data.shards=...)")
    suffixes = SUFFIXES[kind]
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    return _slides_of_files(files, series)


def _is_shard_set(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _slides_of_files(files: Sequence[Path], series: dict[Path, list]) -> list[SlideFile]:
    """One slide per non-DICOM file; the DICOM files' series, from their whole folders (`series` caches them)."""
    dicom = [path for path in files if path.suffix.lower() == DICOM_SUFFIX]
    slides = [SlideFile(slide_id_of_file(path), path, path.parent) for path in files if path not in dicom]
    for folder in sorted({path.parent for path in dicom}):
        given = {path for path in dicom if path.parent == folder}
        if folder not in series:
            series[folder] = _dicom_series(folder)
        slides += [slide for slide, members in series[folder] if given & members]
    return sorted(slides, key=lambda slide: slide.path)


def _dicom_series(folder: Path) -> list[tuple[SlideFile, set[Path]]]:
    """The DICOM whole-slide images among a folder's `.dcm` files, each with its files. An unreadable header
    stays a slide of its own, so that opening it names the problem; other objects are left out, and logged."""
    series: dict[str, list[tuple[Path, DicomHeader]]] = {}
    unreadable: list[Path] = []
    for path in sorted(folder.glob(f"*{DICOM_SUFFIX}")):
        header = read_dicom_header(path)
        if header is None:
            unreadable.append(path)
        elif header.sop_class != WSI_SOP_CLASS:
            log.info("%s: not a whole-slide image (SOP class %s); left out", path, header.sop_class)
        else:
            series.setdefault(header.series_uid, []).append((path, header))
    levels = {uid: [path for path, header in files if header.is_pyramid_level] for uid, files in series.items()}
    for uid in [uid for uid, paths in levels.items() if not paths]:
        log.info("%s: series %s holds no pyramid level (only %s); left out", folder, uid,
                 ", ".join(" ".join(header.image_type) for _, header in series.pop(uid)))
    one_series = len(series) == 1
    found = [(SlideFile(folder.resolve().name if one_series else uid, levels[uid][0],
                        folder.parent if one_series else folder), {path for path, _ in files})
             for uid, files in series.items()]
    return found + [(SlideFile(slide_id_of_file(path), path, folder), {path}) for path in unreadable]
