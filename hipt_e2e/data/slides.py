"""A labelled slide as the slide-level protocol sees it: its id, class, patient and (optional) fixed split."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlideInfo:
    slide_id: str
    label: str
    patient_id: str
    split: str | None = None  # train | val | test when the labels fix the split, else None
