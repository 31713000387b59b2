"""The few header fields of a DICOM file that say which whole-slide image it belongs to (its series and image
flavour: OpenSlide opens a series from any of its files), read without a DICOM library from the file meta
group and the dataset up to SeriesInstanceUID. Little-endian transfer syntaxes only, as OpenSlide reads.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
ASSOCIATED_FLAVOURS = ("LABEL", "OVERVIEW", "THUMBNAIL")  # images of a slide that are no pyramid level
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
UNSUPPORTED_SYNTAXES = ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99")  # big endian, deflated
PREAMBLE = 128

META_GROUP_LENGTH, SOP_CLASS, TRANSFER_SYNTAX = 0x00020000, 0x00020002, 0x00020010
IMAGE_TYPE, SERIES_UID = 0x00080008, 0x0020000E
ITEM_END, SEQUENCE_END = 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
# explicit-VR value representations with a 4-byte length (after 2 reserved bytes)
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())


@dataclass(frozen=True)
class DicomHeader:
    sop_class: str
    series_uid: str
    image_type: tuple[str, ...]

    @property
    def is_pyramid_level(self) -> bool:
        """ImageType's flavour is none of LABEL, OVERVIEW, THUMBNAIL (OpenSlide names any other problem)."""
        return len(self.image_type) < 3 or self.image_type[2] not in ASSOCIATED_FLAVOURS


def read_dicom_header(path: str | Path) -> DicomHeader | None:
    """SOP class, SeriesInstanceUID and ImageType of a DICOM Part 10 file; None for another file, a truncated
    one or a big-endian or deflated one."""
    try:
        with open(path, "rb") as handle:
            handle.seek(PREAMBLE)
            if handle.read(4) != b"DICM":
                return None
            meta = _read_elements(handle, explicit=True, wanted={SOP_CLASS, TRANSFER_SYNTAX}, last=0x0002FFFF)
            syntax = meta.get(TRANSFER_SYNTAX, "")
            if syntax in UNSUPPORTED_SYNTAXES:
                return None
            dataset = _read_elements(handle, explicit=syntax != IMPLICIT_VR_LITTLE_ENDIAN,
                                     wanted={IMAGE_TYPE, SERIES_UID}, last=SERIES_UID)
    except (EOFError, struct.error):
        return None
    if SERIES_UID not in dataset:
        return None
    return DicomHeader(meta.get(SOP_CLASS, ""), dataset[SERIES_UID], tuple(dataset.get(IMAGE_TYPE, "").split("\\")))


def _read_elements(handle: BinaryIO, explicit: bool, wanted: set[int], last: int) -> dict[int, str]:
    """Text values of the `wanted` top-level elements up to tag `last`, or the file meta group's end."""
    values: dict[int, str] = {}
    meta_end = None
    while meta_end is None or handle.tell() < meta_end:
        start = handle.tell()
        tag, length = _element_head(handle, explicit)
        if tag > last:
            handle.seek(start)
            break
        if length == UNDEFINED_LENGTH:
            _skip_undefined(handle, explicit)
            continue
        value = handle.read(length)
        if len(value) < length:
            raise EOFError
        if tag == META_GROUP_LENGTH:
            meta_end = handle.tell() + struct.unpack("<I", value)[0]
        elif tag in wanted:
            values[tag] = value.decode("ascii", "replace").strip(" \0")
        if tag == last:
            break
    return values


def _element_head(handle: BinaryIO, explicit: bool) -> tuple[int, int]:
    """(tag, value length) of the element at the handle, left at its value."""
    head = handle.read(8)
    if len(head) < 8:
        raise EOFError
    group, element = struct.unpack("<HH", head[:4])
    if not explicit or group == 0xFFFE:  # items and delimiters have no VR
        return group << 16 | element, struct.unpack("<I", head[4:])[0]
    if head[4:6] in LONG_VRS:
        return group << 16 | element, struct.unpack("<I", handle.read(4))[0]
    return group << 16 | element, struct.unpack("<H", head[6:])[0]


def _skip_undefined(handle: BinaryIO, explicit: bool) -> None:
    """Move past a sequence or item of undefined length (and all nested in it)."""
    while True:
        tag, length = _element_head(handle, explicit)
        if tag in (ITEM_END, SEQUENCE_END):
            return
        if length == UNDEFINED_LENGTH:
            _skip_undefined(handle, explicit)
        else:
            handle.seek(length, 1)
