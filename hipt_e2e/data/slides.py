"""A labelled slide as the slide-level protocol sees it: its id, class, patient and (optional) fixed split;
and the units that a run bags, labels and predicts (`Level`): the slides, or the patients."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from hipt_e2e.errors import InputError

# slide: each slide is one bag, one label and one prediction row; patient: all regions of a patient's slides
# form one bag (STAMP's patient-level bags) with the patient's one label and one row
Level = Literal["slide", "patient"]


@dataclass(frozen=True)
class SlideInfo:
    slide_id: str
    label: str
    patient_id: str
    split: str | None = None  # train | val | test when the labels fix the split, else None


def units(slides: Sequence[SlideInfo], level: Level, where: object) -> dict[SlideInfo, tuple[str, ...]]:
    """Each unit of `level` with its slides: every slide alone, in input order; or every patient with its
    slides in slide-id order, as a SlideInfo whose id joins theirs with ';' and whose label and split are
    theirs (they must agree; `where`: the file that gave them, for the refusal)."""
    if level == "slide":
        return {slide: (slide.slide_id,) for slide in slides}
    patients: dict[str, list[SlideInfo]] = {}
    for slide in sorted(slides, key=lambda s: s.slide_id):
        patients.setdefault(slide.patient_id, []).append(slide)
    for patient, members in patients.items():
        if len({(s.label, s.split) for s in members}) > 1:
            found = ", ".join(f"{s.slide_id}: {s.label}" + (f" ({s.split})" if s.split else "") for s in members)
            raise InputError(where, f"patient {patient}'s slides differ in label or split ({found}); "
                                    "level=patient needs one label and split per patient")
    return {SlideInfo(";".join(s.slide_id for s in members), members[0].label, patient, members[0].split):
            tuple(s.slide_id for s in members) for patient, members in patients.items()}
