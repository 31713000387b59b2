"""recipes/lymphoma.py, the one-command lymphoma pipeline, at a smoke budget on 8 real fields per class."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import lymphoma_images

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # the real-data pipeline, every step: 240 s (timed out) in a clean-clone make test on 2 busy cores
def test_lymphoma_command_runs_every_step_and_resumes(lymphoma_dir, tmp_path, capsys):
    for path in lymphoma_images(lymphoma_dir, 8):
        (tmp_path / "in" / path.parent.name).mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / path.parent.name / path.name).symlink_to(path)
    spec = importlib.util.spec_from_file_location("recipe_lymphoma", REPO / "recipes" / "lymphoma.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    argv = ["--seed", "3", "--out", str(tmp_path / "run"), "--images", str(tmp_path / "in"), "--budget", "smoke"]
    last = recipe.main(argv)
    assert last.startswith("balanced accuracy: ") and " over 1 x 5 folds (colour baseline on the same folds: " in last
    assert capsys.readouterr().out.strip().splitlines()[-1] == last
    run = tmp_path / "run"
    for name in ("dino/model_card.json", "vit4k/model_card.json", "e2e/fold_4/model_card.json", "e2e/learning_curves.png",
                 "colour/splits.csv"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "e2e" / "metrics.json").read_text())
    assert metrics["seed"] == 3 and metrics["processes"] == 2 and metrics["grad_accum"] == 2  # global batch 4
    assert (run / "e2e" / "splits.csv").read_text() == (run / "colour" / "splits.csv").read_text()
    report = (run / "report.md").read_text()
    assert "| HIPT end to end - colour baseline | balanced accuracy |" in report and last in report
    # everything is done: the same command only re-reads the runs and gives the same answer
    stamp = (run / "e2e" / "metrics.json").stat().st_mtime
    assert recipe.main(argv) == last and (run / "e2e" / "metrics.json").stat().st_mtime == stamp
    # more repeats continue the finished run: the first repeat's folds are kept, not trained again
    first = {path: path.stat().st_mtime for path in (run / "e2e").glob("fold_*/*")}
    more = recipe.main([*argv, "--repeats", "2"])
    assert " over 2 x 5 folds " in more and more != last
    assert {path: path.stat().st_mtime for path in (run / "e2e").glob("fold_*/*")} == first
    metrics = json.loads((run / "e2e" / "metrics.json").read_text())
    assert metrics["repeats"] == 2 and [(f["repeat"], f["fold"]) for f in metrics["folds"]] == [
        (r, f) for r in range(2) for f in range(5)]
    assert (run / "e2e" / "repeat_1_fold_4" / "model_card.json").exists()
    assert (run / "e2e" / "splits.csv").read_text() == (run / "colour" / "splits.csv").read_text()
