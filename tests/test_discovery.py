"""Finding slides: a DICOM whole-slide image (a series of files) is one slide, OME-TIFF resolution and ids, and
inputs that hold no slides, the same in `hipt-shards build` and `hipt-predict`. The DICOM files are written
here with pydicom (uncompressed, TILED_FULL) and read back through OpenSlide."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from hipt_e2e.data.dicom import WSI_SOP_CLASS, read_dicom_header
from hipt_e2e.data.discovery import find_slides
from hipt_e2e.data.sources import InputError, ome_mpp
from hipt_e2e.inference.predict import main as predict_main
from hipt_e2e.models import HIPT
from hipt_e2e.training.checkpointing import export_safetensors
from shards.build import BuildSettings, build
from shards.cli import main as shards_main
from tests.test_shards import samples_of

pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid  # noqa: E402

RNG = np.random.default_rng(0)
BUILD_ARGS = {"region_px": 128, "tile_px": 32, "mpp": 0.5, "min_tissue": 0.0, "encoding": "png"}


def write_dicom_image(path: Path, rgb: np.ndarray, flavour: str, series_uid: str, mpp: float, tile: int = 64,
                      syntax: str = ExplicitVRLittleEndian) -> None:
    """One DICOM file of a whole-slide image: a pyramid level (flavour VOLUME) or a LABEL / OVERVIEW / THUMBNAIL
    image, its pixels as TILED_FULL frames of `tile` px (an associated image as one frame, as scanners write them
    and OpenSlide reads them), with sequences before and after the series UID."""
    tile_rows, tile_cols = (tile, tile) if flavour == "VOLUME" else rgb.shape[:2]
    rows, cols = -(-rgb.shape[0] // tile_rows), -(-rgb.shape[1] // tile_cols)
    padded = np.full((rows * tile_rows, cols * tile_cols, 3), 255, np.uint8)
    padded[: rgb.shape[0], : rgb.shape[1]] = rgb
    frames = padded.reshape(rows, tile_rows, cols, tile_cols, 3).transpose(0, 2, 1, 3, 4)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = WSI_SOP_CLASS
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.ImageType = ["ORIGINAL", "PRIMARY", flavour, "NONE"]
    ds.CodingSchemeIdentificationSequence = [Dataset()]  # (0008,0110): a sequence to skip before the series UID
    ds.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator = "DCM"
    ds.Modality, ds.StudyInstanceUID, ds.SeriesInstanceUID = "SM", "1.2.3.4", series_uid
    ds.Rows, ds.Columns = tile_rows, tile_cols
    ds.NumberOfFrames = rows * cols
    ds.TotalPixelMatrixRows, ds.TotalPixelMatrixColumns = rgb.shape[:2]
    ds.TotalPixelMatrixFocalPlanes, ds.DimensionOrganizationType = 1, "TILED_FULL"
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    measures = Dataset()
    measures.PixelSpacing = [mpp / 1000, mpp / 1000]  # mm
    ds.SharedFunctionalGroupsSequence = [Dataset()]
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence = [measures]
    ds.PixelData = frames.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_dicom_wsi(folder: Path, level0: np.ndarray, mpp: float = 0.5, names: str = "level") -> str:
    """A DICOM WSI of two pyramid levels, a THUMBNAIL and a LABEL (four files of one new series); its series UID."""
    uid = generate_uid()
    write_dicom_image(folder / f"{names}0.dcm", level0, "VOLUME", uid, mpp)
    write_dicom_image(folder / f"{names}1.dcm", level0[::2, ::2].copy(), "VOLUME", uid, 2 * mpp)
    write_dicom_image(folder / f"{names}_thumbnail.dcm", level0[::8, ::8].copy(), "THUMBNAIL", uid, 8 * mpp)
    write_dicom_image(folder / f"{names}_label.dcm", RNG.integers(0, 255, (64, 96, 3), np.uint8), "LABEL", uid, 8 * mpp)
    return uid


def noise(height: int, width: int) -> np.ndarray:
    return RNG.integers(60, 200, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def dicom_root(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """case_a/: one 4-file series (one slide, id case_a); pair/: two series in one folder (ids: their UIDs)."""
    root = tmp_path_factory.mktemp("dicom")
    images = {"case_a": noise(256, 384)}
    write_dicom_wsi(root / "case_a", images["case_a"])
    for name in ("first", "second"):
        pixels = noise(128, 256)
        images[write_dicom_wsi(root / "pair", pixels, names=name)] = pixels
    return root, images


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "hipt.safetensors"
    export_safetensors(HIPT.from_preset("tiny", n_classes=2), path)
    return path


def predict(inputs: list, model: Path, out: Path, *settings: str) -> tuple[int, dict[str, dict]]:
    failed = predict_main([*map(str, inputs), "model.preset=tiny", "model.classes=[a,b]", "geometry.mpp=0.5",
                           "geometry.region_px=128", "geometry.min_tissue=0.0", f"model.weights={model}",
                           f"out={out}", *settings])
    with open(out / "predictions.csv", newline="") as handle:
        return failed, {row["slide_id"]: row for row in csv.DictReader(handle)}


def test_header_reader_agrees_with_pydicom(tmp_path):
    """Series UID and ImageType from explicit and implicit VR files, past a sequence; a non-DICOM file is None."""
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        write_dicom_image(tmp_path / "x.dcm", noise(64, 64), "LABEL", "1.2.3.999", 8.0, syntax=syntax)
        header, reference = read_dicom_header(tmp_path / "x.dcm"), pydicom.dcmread(tmp_path / "x.dcm")
        assert header.series_uid == reference.SeriesInstanceUID == "1.2.3.999"
        assert list(header.image_type) == list(reference.ImageType) == ["ORIGINAL", "PRIMARY", "LABEL", "NONE"]
        assert header.sop_class == WSI_SOP_CLASS and not header.is_pyramid_level
    (tmp_path / "y.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\2\0")  # truncated after the preamble
    assert read_dicom_header(tmp_path / "y.dcm") is None and read_dicom_header(__file__) is None


def test_openslide_opens_a_series_from_any_of_its_files(dicom_root):
    """Why one file per series is enough: OpenSlide reads the whole series from the folder, whichever file it is
    given, and keeps the other series of the same folder apart."""
    root, images = dicom_root
    for name in ("level0.dcm", "level1.dcm", "level_label.dcm"):
        slide = openslide.OpenSlide(str(root / "case_a" / name))
        assert slide.level_dimensions == ((384, 256), (192, 128))
        assert "label" in slide.associated_images  # and "thumbnail" from OpenSlide 4.0.1 on (4.0.0, the floor, lacks it)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
        region = np.asarray(slide.read_region((128, 64), 0, (128, 128)))[..., :3]
        np.testing.assert_array_equal(region, images["case_a"][64:192, 128:256])
    pair = find_slides([root / "pair"])
    assert sorted(s.slide_id for s in pair) == sorted(key for key in images if key != "case_a")
    for slide_file in pair:
        slide = openslide.OpenSlide(str(slide_file.path))
        assert slide.properties["dicom.SeriesInstanceUID"] == slide_file.slide_id and slide.level_count == 2


def test_a_dicom_series_is_one_slide_in_build_and_predict(dicom_root, model, tmp_path, capsys):
    """12 DICOM files = 3 slides (labels, thumbnails and second levels are no slides), ids by the documented rule
    in the labels CSV, the manifest and predictions.csv; build's regions are the level-0 pixels."""
    root, images = dicom_root
    uids = sorted(key for key in images if key != "case_a")
    with open(tmp_path / "labels.csv", "w") as handle:
        handle.write("slide_id,label\ncase_a,a\n" + "".join(f"{uid},b\n" for uid in uids))
    assert shards_main(["build", "slides", str(root), "--out", str(tmp_path / "shards"), "--labels",
                        str(tmp_path / "labels.csv"), "--region-px", "128", "--tile-px", "32", "--mpp", "0.5",
                        "--min-tissue", "0", "--encoding", "png"]) == 0
    assert capsys.readouterr().out.startswith("3 inputs = 3 written + 0 skipped; 10 samples")  # 6 + 2 + 2 regions
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert {s: (e["label"], e["regions"]) for s, e in manifest["slides"].items()} == {
        "case_a": ("a", 6), uids[0]: ("b", 2), uids[1]: ("b", 2)}
    for rgb, record in samples_of(tmp_path / "shards"):
        x, y = record["x"], record["y"]
        np.testing.assert_array_equal(rgb, images[record["slide_id"]][y: y + 128, x: x + 128])

    failed, rows = predict([root], model, tmp_path / "predicted")
    assert failed == 0 and {s: (r["status"], int(r["n_regions"])) for s, r in rows.items()} == {
        "case_a": ("ok", 6), uids[0]: ("ok", 2), uids[1]: ("ok", 2)}
    # the files of one series given one by one are still one slide, named as from its folder
    assert [(s.slide_id, s.path.name) for s in find_slides(sorted((root / "case_a").glob("*.dcm")))] == [
        ("case_a", "level0.dcm")]


def test_labels_from_folders_name_the_folder_above_a_series_folder(tmp_path):
    write_dicom_wsi(tmp_path / "in" / "tumour" / "case_b", noise(128, 128))
    items = build(BuildSettings.from_mapping({**BUILD_ARGS, "kind": "slides", "input": str(tmp_path / "in"), "out": str(tmp_path / "out"),
                                              "labels_from_folders": True}))["slides"]
    assert {s: e["label"] for s, e in items.items()} == {"case_b": "tumour"}


def test_ome_tiff_resolution_from_its_ome_xml_and_one_id(tmp_path, model):
    """A tiled OME-TIFF whose TIFF tags hold no resolution, only the OME-XML (500 nm): slide `x` at 0.5 um/px in
    build and predict alike."""
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "x.ome.tiff", noise(256, 384), tile=(128, 128), photometric="rgb",
                     metadata={"PhysicalSizeX": 500, "PhysicalSizeXUnit": "nm", "PhysicalSizeY": 500,
                               "PhysicalSizeYUnit": "nm"})
    assert openslide.OpenSlide(str(tmp_path / "in" / "x.ome.tiff")).properties.get(openslide.PROPERTY_NAME_MPP_X) is None
    manifest = build(BuildSettings.from_mapping({**BUILD_ARGS, "kind": "slides", "input": str(tmp_path / "in"),
                                                 "out": str(tmp_path / "out")}))
    assert list(manifest["slides"]) == ["x"] and manifest["slides"]["x"]["regions"] == 6
    assert {record["slide_mpp"] for _, record in samples_of(tmp_path / "out")} == {0.5}
    failed, rows = predict([tmp_path / "in" / "x.ome.tiff"], model, tmp_path / "predicted")
    assert failed == 0 and list(rows) == ["x"] and rows["x"]["n_regions"] == "6"


@pytest.mark.parametrize("size,unit,mpp", [("0.25", None, 0.25), ("0.5", "\u00b5m", 0.5), ("250", "nm", 0.25),
                                           ("0.0005", "mm", 0.5), ("0.00005", "cm", 0.5), ("2500", "\u00c5", 0.25)])
def test_ome_pixel_size_units(size, unit, mpp):
    unit_attribute = f' PhysicalSizeXUnit="{unit}"' if unit else ""
    xml = f'<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06"><Image><Pixels PhysicalSizeX="{size}"' \
          f'{unit_attribute}/></Image></OME>'
    assert ome_mpp(Path("x.ome.tif"), xml) == pytest.approx(mpp)


def test_ome_pixel_size_in_pixels_is_refused_and_no_size_is_none():
    with pytest.raises(InputError, match=r"x\.ome\.tif: its OME-XML gives PhysicalSizeX in 'pixel', not a length"):
        ome_mpp(Path("x.ome.tif"), '<OME><Image><Pixels PhysicalSizeX="1" PhysicalSizeXUnit="pixel"/></Image></OME>')
    assert ome_mpp(Path("x.ome.tif"), "<OME><Image><Pixels SizeX='4'/></Image></OME>") is None
    assert ome_mpp(Path("x.tif"), "Aperio Image Library") is None


def test_a_shard_set_or_an_empty_folder_given_as_slides_is_refused(tmp_path, model):
    """Where slides are expected: a shard set names itself and input_kind=shards; a folder without slides names
    the suffixes looked for; in build and predict alike."""
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "s.tiff", noise(128, 128), tile=(128, 128), photometric="rgb",
                     resolution=(2e4, 2e4), resolutionunit="CENTIMETER")  # 0.5 um/px
    build(BuildSettings.from_mapping({**BUILD_ARGS, "kind": "slides", "input": str(tmp_path / "in"), "out": str(tmp_path / "shards")}))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "notes.txt").write_text("no slides here")
    for given, message in ((tmp_path / "shards", r"shards: holds a shard set .*input_kind=shards"),
                           (tmp_path / "empty", r"empty: holds no slides \(looked for \.svs, .*\.dcm")):
        with pytest.raises(InputError, match=message):
            build(BuildSettings.from_mapping({**BUILD_ARGS, "kind": "slides", "input": str(given), "out": str(tmp_path / "refused")}))
        with pytest.raises(InputError, match=message):
            predict([given], model, tmp_path / "not_predicted")
        assert not (tmp_path / "not_predicted").exists()  # refused before anything is written
    with pytest.raises(InputError, match=r"empty: holds no images \(looked for \.png"):
        build(BuildSettings.from_mapping({**BUILD_ARGS, "kind": "images", "input": str(tmp_path / "empty"),
                                          "out": str(tmp_path / "refused")}))
    failed, rows = predict([tmp_path / "shards"], model, tmp_path / "predicted", "input_kind=shards")
    assert failed == 0 and list(rows) == ["s"]
