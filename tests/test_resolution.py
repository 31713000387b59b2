"""Slide resolution you can trust: display resolutions in TIFF headers and upsampling are refused, clearly,
by shard building and prediction alike; progress goes to log lines when stderr is not a terminal."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hipt_e2e.data.sources import implausible_mpp
from hipt_e2e.inference.predict import main as predict_main
from hipt_e2e.models import HIPT
from hipt_e2e.progress import LogLines, progress
from hipt_e2e.training.checkpointing import export_safetensors
from shards.build import BuildError, BuildSettings, build

RNG = np.random.default_rng(0)


def write_tiff(path: Path, resolution: tuple[float, str] | None, size: tuple[int, int] = (250, 300)) -> Path:
    """A generic tiled RGB TIFF (tissue-like noise), its resolution tags as an image editor writes them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = RNG.integers(60, 200, (*size, 3), dtype=np.uint8)
    tags = {} if resolution is None else {"resolution": (resolution[0],) * 2, "resolutionunit": resolution[1]}
    tifffile.imwrite(path, pixels, tile=(128, 128), photometric="rgb", **tags)
    return path


def test_display_resolutions_are_recognised():
    assert implausible_mpp(0.25) is None and implausible_mpp(0.5) is None and implausible_mpp(8.0) is None
    assert implausible_mpp(25_400 / 72) == "a display resolution (72 px per inch), outside the 0.05-20.0 um/px microscopes produce"
    assert implausible_mpp(1_000 / 96) == "a display resolution (96 px per mm)"  # 10.4 um/px: in range, yet a dpi
    assert implausible_mpp(0.01).startswith("outside the 0.05-20.0 um/px")


def test_build_refuses_a_72_dpi_tiff_unless_its_resolution_is_given(tmp_path):
    write_tiff(tmp_path / "in" / "photo.tiff", (72, "INCH"))
    args = {"kind": "slides", "input": str(tmp_path / "in"), "region_px": 64, "tile_px": 32, "min_tissue": 0.0}
    with pytest.raises(BuildError, match=r"photo\.tiff: its metadata gives 352\.8 um/px, a display resolution "
                                         r"\(72 px per inch\).*pass --slide-mpp"):
        build(BuildSettings.from_mapping({**args, "out": str(tmp_path / "a")}))
    skipped = build(BuildSettings.from_mapping({**args, "out": str(tmp_path / "b"), "on_error": "skip"}))
    assert skipped["written"] == 0 and "352.8 um/px" in skipped["skipped"][0]["reason"]
    rescued = build(BuildSettings.from_mapping({**args, "out": str(tmp_path / "c"), "slide_mpp": 0.5}))
    assert rescued["written"] == 1 and rescued["samples"] == 20  # 300 x 250 px at 0.5 um/px: 5 x 4 regions of 64


def test_build_refuses_to_upsample_unless_allowed(tmp_path):
    write_tiff(tmp_path / "in" / "scan.tiff", (1e4 / 1.0, "CENTIMETER"))  # a 1 um/px scan
    args = {"kind": "slides", "input": str(tmp_path / "in"), "region_px": 64, "tile_px": 32, "min_tissue": 0.0}
    with pytest.raises(BuildError, match=r"scan\.tiff: reading it at 0\.5 um/px would enlarge its 1 um/px 2x"):
        build(BuildSettings.from_mapping({**args, "out": str(tmp_path / "a"), "mpp": 0.5}))
    assert build(BuildSettings.from_mapping({**args, "out": str(tmp_path / "b"), "mpp": 0.8}))["written"] == 1  # 1.25x: within the margin
    assert build(BuildSettings.from_mapping({**args, "out": str(tmp_path / "c"), "mpp": 0.5, "allow_upsample": True}))["written"] == 1


def test_predict_lists_the_same_problems(tmp_path):
    write_tiff(tmp_path / "in" / "photo.tiff", (72, "INCH"))
    write_tiff(tmp_path / "in" / "scan.tiff", (1e4 / 1.0, "CENTIMETER"))
    export_safetensors(HIPT.from_preset("tiny", n_classes=2), tmp_path / "hipt.safetensors")
    failed = predict_main([str(tmp_path / "in"), "model.preset=tiny", "model.classes=[a,b]", "geometry.mpp=0.5",
                           f"model.weights={tmp_path / 'hipt.safetensors'}", f"out={tmp_path / 'out'}"])
    rows = {row["slide_id"]: row for row in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))}
    assert failed == 2 and {row["status"] for row in rows.values()} == {"failed"}
    assert "display resolution (72 px per inch)" in rows["photo"]["error"]
    assert "would enlarge its 1 um/px 2x" in rows["scan"]["error"]


def test_progress_is_log_lines_without_a_terminal(caplog, capsys):
    with caplog.at_level(logging.INFO, logger="hipt_e2e.progress"):
        bar = progress(range(5), desc="work", unit="item", mininterval=0)
        assert isinstance(bar, LogLines)  # pytest's stderr is not a terminal
        for _ in bar:
            pass
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("work: 0/5 item [") and lines[-1].startswith("work: 5/5 item [")
    assert "left" in lines[-1] and "item/s" in lines[-1]
    assert "\r" not in capsys.readouterr().err
    # set_postfix (every training step) does not add lines: they stay one per interval
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="hipt_e2e.progress"):
        bar = progress(total=100, desc="steps", unit="step")
        for step in range(100):
            bar.update()
            bar.set_postfix(loss=step)
        bar.close()
    assert len(caplog.records) == 2 and caplog.records[-1].getMessage().startswith("steps: 100/100 step [")
    assert "loss=99" in caplog.records[-1].getMessage()
