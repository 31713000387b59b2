"""User errors as one line `error: ...` (exit 2) from every entry point, a traceback only for bugs or with
HIPT_DEBUG=1; refused builds and embedding runs leave nothing that blocks the corrected command."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from accelerate import Accelerator
from torch.utils.data import DataLoader, Dataset

from hipt_e2e import errors
from hipt_e2e.config import resolve_config
from hipt_e2e.data.embeddings import write_slide_bags
from hipt_e2e.data.writer import ShardSetWriter, UnitShards
from hipt_e2e.errors import USER_ERROR_EXIT, InputError, UnknownSettingError, UserError, error_message, run_main
from shards.cli import main as hipt_shards
from tests.test_slide_training import CLASSES, make_bags

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HIPT_DEBUG": "0"}
TOO_FEW = "error: class(es) with fewer patients than the 5 folds asked for: {'a': 1, 'b': 1, 'c': 1}; use fewer folds or more data"


def _run(*command: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*command], env={**ENV, **(env or {})}, cwd=REPO, capture_output=True, text=True, timeout=120)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def few_bags(tmp_path_factory) -> Path:
    """Slide bags of one patient per class: too few for the 5 folds train_wsi asks for by default."""
    out = tmp_path_factory.mktemp("few")
    write_slide_bags(out, make_bags(n_per_class=2), CLASSES, build_args={})
    return out


def _refuse() -> None:
    resolve_config({"optim": {"lr": 1.0}}, None, ["optim.lrr=2"])


def test_run_main_prints_one_line_and_debug_keeps_the_traceback(capsys, monkeypatch):
    monkeypatch.setenv("HIPT_DEBUG", "0")  # restored after the test, which --debug sets to 1
    monkeypatch.setattr(sys, "argv", ["cmd", "x=1"])
    assert run_main(_refuse) == USER_ERROR_EXIT
    assert capsys.readouterr().err == "error: unknown config key 'optim.lrr'; known keys here: ['lr']\n"  # no KeyError quotes
    assert run_main(lambda: 3) == 3 and run_main(lambda: {"metrics": 1}) == 0
    monkeypatch.setattr(sys, "argv", ["cmd", "--debug", "x=1"])
    with pytest.raises(UnknownSettingError):
        run_main(_refuse)
    assert sys.argv == ["cmd", "x=1"] and os.environ["HIPT_DEBUG"] == "1"  # taken off, passed on to child processes
    os.environ["HIPT_DEBUG"] = "0"
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_main(lambda: 1 / 0)


def test_other_ranks_report_only_an_error_of_their_own(capsys, monkeypatch):
    """Rank 1 waits RANK_GRACE_S for rank 0 to report (the launcher then ends it); alive after it, it reports."""
    monkeypatch.setattr(sys, "argv", ["cmd"])
    monkeypatch.setenv("HIPT_DEBUG", "0")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(errors, "RANK_GRACE_S", 0.2)
    start = time.monotonic()
    assert run_main(_refuse) == USER_ERROR_EXIT
    assert time.monotonic() - start >= 0.2
    assert capsys.readouterr().err.startswith("error: rank 1: unknown config key 'optim.lrr'")


@pytest.mark.parametrize("launcher", ["python", "accelerate"])
def test_too_few_slides_for_the_folds_is_one_line(few_bags, tmp_path, launcher):
    """Directly: the line once, exit 2. Under `accelerate launch -q`, the child's line once and accelerate's
    exit 1 (without -q accelerate repeats the child's stderr in its CalledProcessError traceback)."""
    launch = ([sys.executable, "-m", "accelerate.commands.launch", "-q", "--cpu", "--num_processes", "1",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
              if launcher == "accelerate" else [sys.executable])
    result = _run(*launch, "recipes/train_wsi.py", f"data.shards={few_bags}", f"out={tmp_path / 'out'}")
    assert _error_lines(result.stderr) == [TOO_FEW], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert result.returncode == (USER_ERROR_EXIT if launcher == "python" else 1)


def test_debug_shows_the_traceback(few_bags, tmp_path):
    result = _run(sys.executable, "recipes/train_wsi.py", f"data.shards={few_bags}", f"out={tmp_path / 'out'}",
                  env={"HIPT_DEBUG": "1"})
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert "hipt_e2e.evaluation.splits.SplitError: class(es) with fewer patients" in result.stderr


def test_hipt_shards_missing_input_folder(tmp_path):
    missing = _run(sys.executable, "-m", "shards", "build", "slides", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"))
    assert (missing.returncode, missing.stderr) == (2, f"error: {tmp_path / 'nowhere'}: input folder not found\n")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="the gcs extra is installed here")
def test_missing_extra_names_it():
    result = _run(sys.executable, "-m", "shards", "verify", "gs://bucket/set")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = _error_lines(result.stderr)
    assert line.startswith("error: gs://bucket/set/manifest.json: reading gs:// needs pip install 'hipt-e2e[gcs]' ("), line


def _tiff_72_dpi(folder: Path) -> Path:
    """One 512 px RGB slide whose TIFF resolution is a display's 72 dpi (352.8 um/px), which build refuses."""
    folder.mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(60, 200, (512, 512, 3), dtype=np.uint8)
    tifffile.imwrite(folder / "s1.tif", pixels, tile=(256, 256), resolution=(72, 72), resolutionunit="INCH",
                     photometric="rgb")
    (folder.parent / "labels.csv").write_text("slide_id,label\ns1,a\n")
    return folder


def test_refused_build_leaves_nothing_in_the_way_of_the_fix_it_suggests(tmp_path):
    slides, out = _tiff_72_dpi(tmp_path / "slides"), tmp_path / "shards"
    command = ["build", "slides", str(slides), "--out", str(out), "--labels", str(tmp_path / "labels.csv"),
               "--region-px", "256", "--tile-px", "64", "--min-tissue", "0"]
    with pytest.raises(UserError, match=r"s1\.tif: its metadata gives 352\.8 um/px.*pass --slide-mpp to state it"):
        hipt_shards(command)
    assert not (out / "build-config.yaml").exists()  # a refused build records no settings
    assert hipt_shards([*command, "--slide-mpp", "0.5"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["written"], manifest["samples"], manifest["build_args"]["slide_mpp"]) == (1, 4, 0.5)
    assert "slide_mpp: 0.5" in (out / "build-config.yaml").read_text()
    # a build that wrote a shard is protected: interrupted (no manifest yet), it refuses other settings
    (out / "manifest.json").unlink()
    with pytest.raises(UserError, match="holds an interrupted build with other settings"):
        hipt_shards([*command, "--slide-mpp", "0.25"])
    assert hipt_shards([*command, "--slide-mpp", "0.5"]) == 0  # and resumes with its own


def test_error_in_a_dataloader_worker_is_its_own_message(tmp_path):
    """torch re-raises a worker's error as `Caught ... Original Traceback ...`; the line is the message."""
    slides, out = _tiff_72_dpi(tmp_path / "slides"), tmp_path / "shards"
    assert hipt_shards(["build", "slides", str(slides), "--out", str(out), "--labels", str(tmp_path / "labels.csv"),
                        "--region-px", "256", "--tile-px", "64", "--slide-mpp", "0.5"]) == 0
    (out / "shard-000000.tar").unlink()
    with pytest.raises(FileNotFoundError) as raised:
        hipt_shards(["bench", str(out), "--workers", "1", "--seconds", "1"])
    assert str(raised.value).startswith("Caught FileNotFoundError in DataLoader worker process 0.")
    assert error_message(raised.value) == f"{out / 'shard-000000.tar'}: no such file"


def test_input_errors_cross_processes_as_their_message():
    """Pickled (build workers) or rebuilt from the message (DataLoader workers), an InputError keeps its line."""
    error = InputError("slides/a.svs", "no resolution")
    assert str(pickle.loads(pickle.dumps(error))) == str(InputError(str(error))) == "slides/a.svs: no resolution"
    with pytest.raises(InputError) as raised:
        next(iter(DataLoader(_RefusingDataset(), num_workers=1)))
    assert error_message(raised.value) == "slides/a.svs: no resolution"


class _RefusingDataset(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        raise InputError("slides/a.svs", "no resolution")


def done(settings: dict, folder: Path) -> set[int]:
    """The units an embedding run with these settings finds done in folder (as embed_tiles asks)."""
    accelerator = Accelerator(cpu=True)
    return set(ShardSetWriter(folder, settings).resume(accelerator.is_main_process, accelerator.wait_for_everyone))


def test_embedding_run_without_a_finished_unit_takes_new_settings(tmp_path):
    assert done({"model": "a"}, tmp_path) == set()  # a run that died before its first unit
    outputs = UnitShards(ShardSetWriter(tmp_path, {"model": "b"}))
    assert done({"model": "b"}, tmp_path) == set()
    grid = {"__key__": "r0000", "json": b"{}"}
    outputs.add(0, grid, {"slide_id": "s", "label": "a", "patient_id": "p"}, 1)
    outputs.close(0, 1)
    assert done({"model": "b"}, tmp_path) == {0}
    with pytest.raises(FileExistsError, match="holds an interrupted run with other settings"):
        done({"model": "c"}, tmp_path)



def _recipe_main(argv: list[str]) -> None:
    """The parser every recipe shares (hipt_e2e.training.recipe), over the e2e recipe's defaults."""
    from hipt_e2e.training.e2e import E2ESettings
    from hipt_e2e.training.recipe import recipe_settings
    recipe_settings(E2ESettings, "the e2e recipe", argv)


HELP_COMMANDS = {  # command -> (its main, argv before --help, its required options)
    "hipt-shards": ("shards.cli", [], ()), "hipt-shards build": ("shards.cli", ["build"], ("--out",)),
    "hipt-shards merge": ("shards.cli", ["merge"], ()), "hipt-shards verify": ("shards.cli", ["verify"], ()),
    "hipt-shards inspect": ("shards.cli", ["inspect"], ()), "hipt-shards bench": ("shards.cli", ["bench"], ()),
    "hipt-predict": ("hipt_e2e.inference.predict", [], ()), "hipt-convert": ("hipt_e2e.models.convert", [], ()),
    "recipes": (None, [], ()), "compare": ("hipt_e2e.evaluation.compare", [], ()),
    "rescore": ("hipt_e2e.training.rescore", [], ("--out",)),
    "knn": ("hipt_e2e.evaluation.knn", [], ("--run", "--images", "--tile-px")),
    "colour_baseline": ("hipt_e2e.training.colour_baseline", [], ("--images", "--out")),
    "synthetic": ("hipt_e2e.data.synthetic", [], ("--out",)),
}


@pytest.mark.parametrize("command", sorted(HELP_COMMANDS))
def test_help_describes_every_option_with_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: an option's help on its line, or the next if the flag is long
    module, argv, required = HELP_COMMANDS[command]
    main = importlib.import_module(module).main if module else _recipe_main
    with pytest.raises(SystemExit) as exited:
        main([*argv, "--help"])
    text = capsys.readouterr().out
    assert exited.value.code == 0 and "e.g. model.depth=2" not in text
    options: list[list[str]] = []  # [flag, description]
    for line in text.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            flag, _, description = line.strip().partition("  ")
            options.append([flag, description.strip()])
        elif line.startswith("    ") and options:
            options[-1][1] += line.strip()
    assert options, text
    for flag, description in options:
        assert description, f"{command}: {flag} has no description"
        if not flag.startswith(("-h", *required)):
            assert "default: " in description, f"{command}: {flag} {description} states no default"
