"""Writing shard sets: the one writer of `hipt-shards build`, both embedding steps and slide bags.

Each closed shard gets a record (its manifest entry, its index rows, what the policy adds) in `OUT/units/`, after
the run's settings: a rerun with the same settings keeps the recorded shards, one with other settings is refused,
and the manifest and index are written from the records. SizedShards packs shards by size in sample order;
UnitShards writes one shard per input unit, so any number of processes write the same files.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import webdataset as wds

from hipt_e2e.data.index import index_file, write_index
from hipt_e2e.data.manifest import MANIFEST, shard_set_manifest
from hipt_e2e.errors import OtherSettingsError
from hipt_e2e.io import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

UNITS = "units"  # OUT/units/: the settings, then one record per closed shard
SETTINGS = "settings.json"
OLD_JOURNAL = "build-journal.jsonl"  # what builds before the records wrote: settings, then a line per closed shard


class OpenShard:
    """A shard being written: `shard-NNNNNN.tar.tmp` until `close` renames it into place."""

    def __init__(self, folder: Path, number: int) -> None:
        self.path = folder / f"shard-{number:06d}.tar"
        self.temporary = folder / f"{self.path.name}.tmp"
        self.stream = open(self.temporary, "wb")
        self.tar = wds.TarWriter(self.stream, encoder=False, mtime=0)
        self.samples = 0
        self.slides: dict[str, int] = {}  # samples per slide

    def write(self, sample: dict, slide_id: str | None) -> None:
        """Append a sample; `slide_id` is None for unlabelled tiles."""
        self.tar.write(sample)
        self.samples += 1
        if slide_id is not None:
            self.slides[slide_id] = self.slides.get(slide_id, 0) + 1

    def close(self, slide_continues: bool = False) -> dict[str, Any]:
        """Close atomically (fsync, rename into place); returns the shard's record."""
        self.tar.close()
        self.stream.flush()
        os.fsync(self.stream.fileno())
        self.stream.close()
        os.replace(self.temporary, self.path)
        shard = {"name": self.path.name, "samples": self.samples, "bytes": self.path.stat().st_size,
                 "sha256": sha256_file(self.path), "slides": self.slides, "slide_continues": slide_continues}
        return {"shard": shard, "index": index_file(self.path)}  # read back while the shard is in the page cache

    def abort(self) -> None:
        self.tar.close()
        self.stream.close()
        self.temporary.unlink(missing_ok=True)


class ShardSetWriter:
    """An output folder of shards: the settings guard, the records of closed shards, the manifest and index.
    `settings` are recorded as the manifest's build_args; `noun` and `out_option` name the run in refusals."""

    def __init__(self, out: str | Path, settings: Mapping[str, Any], *, noun: str = "run",
                 out_option: str = "out=") -> None:
        self.out = Path(out)
        self.settings = json.loads(json.dumps(dict(settings)))  # as recorded, so that a rerun compares alike
        self.records = self.out / UNITS
        self.noun, self.out_option = noun, out_option

    def finished(self) -> dict | None:
        """The manifest of a set finished with these settings, None when there is none; refuses other settings."""
        if not (self.out / MANIFEST).exists():
            return None
        manifest = json.loads((self.out / MANIFEST).read_text())
        if manifest["build_args"] != self.settings:
            raise OtherSettingsError(f"{self.out} already holds a {self.noun} with other settings; "
                                     f"use another {self.out_option}")
        log.info("%s is already complete (%d samples in %d shards); nothing to do", self.out, manifest["samples"],
                 len(manifest["shards"]))
        return manifest

    def resume(self, is_main: bool = True, wait: Callable[[], Any] = lambda: None) -> dict[int, dict]:
        """The records, by number, of the shards an interrupted run with these settings closed. A run with other
        settings is refused once it closed a shard; one that closed none is taken over (a corrected command runs
        into the same folder). Several processes: `is_main` records, the others `wait` for it."""
        settings = self.records / SETTINGS
        if is_main:
            self._convert_journal()
            self.records.mkdir(parents=True, exist_ok=True)
            if not settings.exists() or not self._numbers():
                atomic_write_json(settings, self.settings)
        wait()
        if json.loads(settings.read_text()) != self.settings:
            raise OtherSettingsError(f"{self.out} holds an interrupted {self.noun} with other settings; "
                                     f"use another {self.out_option} or delete it")
        return self.recorded()

    def recorded(self) -> dict[int, dict]:
        return {number: json.loads(self._record_path(number).read_text()) for number in self._numbers()}

    def restart(self) -> None:
        """Forget what an earlier run recorded here (a set written from what the caller holds cannot resume)."""
        shutil.rmtree(self.records, ignore_errors=True)
        self.resume()

    def record(self, number: int, record: Mapping[str, Any]) -> None:
        atomic_write_json(self._record_path(number), record)

    def write_manifest(self, records: Sequence[Mapping], kind: str, classes: Sequence[str],
                       slides: Mapping[str, Mapping], **accounting: Any) -> dict:
        """Write the manifest (`accounting`: see shard_set_manifest) and index of these records' shards; `slides`:
        each slide's entry, to which the shards holding it are added."""
        shards = [record["shard"] for record in records]
        holding: dict[str, list[str]] = {}
        for shard in shards:
            for slide_id in shard["slides"]:
                holding.setdefault(slide_id, []).append(shard["name"])
        slides = {slide_id: {**entry, "shards": holding[slide_id]} for slide_id, entry in slides.items()}
        manifest = shard_set_manifest(kind, self.settings, classes, slides, shards, **accounting)
        write_index(self.out, shards, {record["shard"]["name"]: record["index"] for record in records})
        atomic_write_json(self.out / MANIFEST, manifest)
        return manifest

    def _numbers(self) -> list[int]:
        return sorted(int(path.stem) for path in self.records.glob("[0-9]*.json"))

    def _record_path(self, number: int) -> Path:
        return self.records / f"{number:06d}.json"

    def _convert_journal(self) -> None:
        """Take over the journal of an interrupted build of an earlier version (settings, then a SizedShards record
        per closed shard) as records; a closing line without a shard held only skips the rerun meets again."""
        journal = self.out / OLD_JOURNAL
        if not journal.exists() or (self.out / MANIFEST).exists():
            return
        lines = [json.loads(line) for line in journal.read_text().splitlines() if line.strip()]
        self.records.mkdir(parents=True, exist_ok=True)
        for number, entry in enumerate(entry for entry in lines[1:] if "shard" in entry):
            self.record(number, entry)
        atomic_write_json(self.records / SETTINGS, lines[0]["build_args"])
        journal.unlink()


class SizedShards:
    """Shards of at most `shard_bytes` (at least one sample) in sample order, after the `records` of an interrupted
    run; each record adds the position (item, sample) to resume from (None: the end) and the skips before it."""

    def __init__(self, shard_set: ShardSetWriter, shard_bytes: int, records: Mapping[int, dict]) -> None:
        self.shard_set, self.shard_bytes = shard_set, shard_bytes
        self.records = [records[number] for number in sorted(records)]
        self.open: OpenShard | None = None
        self.skipped: list[dict] = []  # since the last record

    def resume_position(self) -> tuple[int, int] | None:
        """(item, sample) to go on from, None when the recorded shards hold every item."""
        if not self.records:
            return 0, 0
        position = self.records[-1]["resume"]
        return tuple(position) if position else None

    def add(self, sample: dict, slide_id: str | None, position: tuple[int, int]) -> None:
        """Append a sample at `position` (item, sample); a full shard is closed first."""
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__")) + 1024 * len(sample)
        if self.open is not None and self.open.stream.tell() + size > self.shard_bytes:
            self._close(position, slide_continues=slide_id in self.open.slides)
        if self.open is None:
            self.open = OpenShard(self.shard_set.out, len(self.records))
        self.open.write(sample, slide_id)

    def skip(self, record: dict) -> None:
        self.skipped.append(record)

    def finish(self) -> tuple[list[dict], list[dict]]:
        """Close the last shard; returns every shard's record and every skip."""
        if self.open is not None:
            self._close(None)
        return self.records, [entry for record in self.records for entry in record["skipped"]] + self.skipped

    def abort(self) -> None:
        if self.open is not None:
            self.open.abort()
            self.open = None

    def _close(self, resume: tuple[int, int] | None, slide_continues: bool = False) -> None:
        record = {"resume": list(resume) if resume else None, "skipped": self.skipped,
                  **self.open.close(slide_continues)}
        self.shard_set.record(len(self.records), record)
        self.records.append(record)
        self.open, self.skipped = None, []


class UnitShards:
    """One shard per input unit, `shard-{unit:06d}.tar`, whichever process writes it; a record adds the manifest
    entries of the unit's slides."""

    def __init__(self, shard_set: ShardSetWriter) -> None:
        self.shard_set = shard_set
        self.open: dict[int, tuple[OpenShard, dict[str, dict]]] = {}

    def add(self, unit: int, sample: dict, slide: Mapping[str, Any], regions: int) -> None:
        """A sample of `unit` for `slide` (its record or bag: label, patient, split), holding `regions` input regions."""
        if unit not in self.open:
            self.open[unit] = (OpenShard(self.shard_set.out, unit), {})
        shard, slides = self.open[unit]
        shard.write(sample, slide["slide_id"])
        entry = slides.setdefault(slide["slide_id"], {"label": slide["label"], "patient_id": slide["patient_id"],
                                                      "split": slide.get("split"), "regions": 0})
        entry["regions"] += regions

    def close(self, unit: int, inputs: int) -> None:
        """Close and record unit's shard, which must hold its `inputs` input regions."""
        shard, slides = self.open.pop(unit)
        written = sum(entry["regions"] for entry in slides.values())
        if written != inputs:
            raise RuntimeError(f"{shard.path}: wrote {written} regions of the {inputs} its input holds")
        self.shard_set.record(unit, {**shard.close(), "slides": slides})

    def finish(self, kind: str, classes: Sequence[str], inputs: int, units: int,
               lineage: Mapping | None = None) -> dict:
        """The manifest and index from the records of all `units` (every process done), which hold `inputs` regions."""
        recorded = self.shard_set.recorded()
        records = [recorded[unit] for unit in range(units)]
        slides = {slide_id: entry for record in records for slide_id, entry in record["slides"].items()}
        written = sum(entry["regions"] for entry in slides.values())
        if written != inputs:
            raise RuntimeError(f"{self.shard_set.out}: {written} regions written of {inputs} input regions")
        return self.shard_set.write_manifest(records, kind, classes, slides, inputs=inputs, written=written,
                                          lineage=lineage)
