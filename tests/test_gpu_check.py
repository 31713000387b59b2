"""benchmarks/gpu_check.py's dry run on the CPU, so the prepared GPU command cannot rot."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.slow  # six parts, each a fresh process: 240 s (timed out) in a clean-clone make test on 2 busy cores
def test_dry_run_writes_every_part(tmp_path):
    results = gpu_check.main(["--out", str(tmp_path), "--device", "cpu", "--tiny"])
    assert list(results) == ["tile", "embed", "e2e", "predict", "foundation", "tests"]
    assert all(result["exit_code"] == 0 for result in results.values()), {n: r["error"] for n, r in results.items()}
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == results
    assert results["predict"]["last_line"].startswith("predict tiles/s: ")
    assert results["embed"]["last_line"].startswith("embed tiles/s: cpu decode ")
    assert json.loads(results["foundation"]["last_line"])["mode"] == "lora"  # the per-region slope line
    assert any(line.startswith("| vit256, bf16 autocast |") for line in results["tile"]["table"])
    assert "| part | result (last line) | s | status |" in (tmp_path / "gpu_check.md").read_text()
    # a part that runs past its time box is recorded as such, and the rest still runs
    timed_out = gpu_check.run_part([sys.executable, "-c", "import time; print('| started |'); time.sleep(30)"], 2)
    assert timed_out["exit_code"] is None and timed_out["error"] == "timed out after 2 s"
    # what the part started goes with it (a launcher's workers would otherwise hold the GPU)
    child = tmp_path / "child.pid"
    spawn = (f"import subprocess, sys, time, pathlib; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             f"time.sleep(60)']); pathlib.Path({str(child)!r}).write_text(str(p.pid)); time.sleep(60)")
    assert gpu_check.run_part([sys.executable, "-c", spawn], 3)["exit_code"] is None
    status = Path(f"/proc/{child.read_text()}/status")  # gone, or killed and not yet reaped by init
    assert not status.exists() or "State:\tZ" in status.read_text()
