"""A cohort on several machines: the embedding steps killed and rerun continue to the uninterrupted run's
bytes, give the same bytes on two machines (two launchers on 127.0.0.1, one CPU process each, gloo) as
in one process; end-to-end training killed on one rank restarts (torchrun --max-restarts, resume=true) to
the uninterrupted run's predictions."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from hipt_e2e.data import load_manifest
from hipt_e2e.data.writer import UNITS
from hipt_e2e.embedding import slide_units
from hipt_e2e.models import model_preset, vit4k, vit256
from hipt_e2e.training.checkpointing import export_safetensors
from tests.launch import REPO, free_port, launch
from tests.processes import run
from tests.test_e2e import settings as e2e_settings

TINY = model_preset("tiny")


@pytest.fixture(scope="module")
def shards(e2e_slides: Path, tmp_path_factory) -> Path:
    """The 12 e2e slides, one region per shard: a unit (the shards of one slide) per slide."""
    from shards.build import BuildSettings, build

    out = tmp_path_factory.mktemp("cohort") / "shards"
    build(BuildSettings.from_mapping({"kind": "images", "input": str(e2e_slides), "labels": str(e2e_slides / "labels.csv"), "out": str(out),
                                      "slide_mpp": 0.5, "region_px": 128, "tile_px": 32, "encoding": "png", "shard_bytes": 1}))
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Fixed tile and region encoder weights (random init, seeded), so every process embeds alike."""
    import torch

    root = tmp_path_factory.mktemp("weights")
    torch.manual_seed(0)
    export_safetensors(vit256(**TINY["tile"]), root / "tile.safetensors")
    export_safetensors(vit4k(**TINY["region"]), root / "region.safetensors")
    return {"tile": root / "tile.safetensors", "region": root / "region.safetensors"}


def step_args(step: str, source: Path, out: Path, weights: Path) -> list[str]:
    return ["--config", str(REPO / "recipes" / "configs" / "tiny" / f"{step}.yaml"), f"data.shards={source}",
            f"out={out}", f"model.weights={weights}"]


ONE_PROCESS = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # the launcher's threads


def run_step(step: str, *arguments: str, script: Sequence[str] = ()) -> subprocess.CompletedProcess:
    return run([sys.executable, *script, str(REPO / "recipes" / f"{step}.py"), *arguments], cwd=REPO, timeout=300,
               env=ONE_PROCESS)


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_embedding_killed_and_rerun_gives_the_uninterrupted_bytes(shards: Path, weights, tmp_path: Path) -> None:
    out = tmp_path / "grids"
    arguments = step_args("embed_tiles", shards, out, weights["tile"])
    assert run_step("embed_tiles", *arguments).returncode == 0
    whole = files(out)
    units = len(slide_units(load_manifest(shards)))
    assert units == 12 and len([name for name in whole if name.startswith("shard-")]) == units
    shutil.rmtree(out)
    # Killed in the middle of a unit (its shard half written), then run again with the same command.
    died = run_step("embed_tiles", *arguments, script=[str(REPO / "tests" / "crash.py"),
                                                       "hipt_e2e.data.writer:UnitShards.add", "10"])
    assert died.returncode == 17, died.stderr[-2000:]
    finished = sorted(p.name for p in (out / UNITS).glob("[0-9]*.json"))
    assert 0 < len(finished) < units and any(out.glob("*.tmp")) and not (out / "manifest.json").exists()
    # Other settings are refused rather than mixed in; the same command continues.
    other = run_step("embed_tiles", *arguments, "embed.dtype=float16")
    assert other.returncode != 0 and "holds an interrupted run with other settings" in other.stderr
    again = run_step("embed_tiles", *arguments)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{len(finished)} of {units} units done by an earlier run" in again.stderr
    assert files(out) == whole


def test_two_machines_write_the_bytes_of_one_process(shards: Path, weights, tmp_path: Path) -> None:
    """embed_regions as two launchers on 127.0.0.1 with 5 DataLoader workers each (embed_tiles goes through
    recipes/slurm.sh below): 10 readers over 12 units, so rank 0 has 7 units and rank 1 five, and waits;
    against one process with its 5 readers."""
    source = tmp_path / "grids"
    assert run_step("embed_tiles", *step_args("embed_tiles", shards, source, weights["tile"])).returncode == 0
    out = tmp_path / "out"
    arguments = [*step_args("embed_regions", source, out, weights["region"]), "data.workers=5"]
    assert run_step("embed_regions", *arguments).returncode == 0
    one = files(out)
    shutil.rmtree(out)
    two = launch("recipes/embed_regions.py", arguments, processes=2, machines=2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert files(out) == one


def test_end_to_end_killed_on_one_rank_restarts_to_the_same_predictions(shards: Path, tmp_path: Path) -> None:
    arguments = ["resume=true", "train.epochs=2", "train.checkpoint_every=2"]  # 3rd save: in fold 1
    whole = launch("recipes/e2e.py", e2e_settings(shards, tmp_path / "whole", *arguments))
    assert whole.returncode == 0, whole.stderr[-3000:]
    # Rank 1 dies after its third checkpoint save on the first attempt; torchrun restarts both processes,
    # which resume from the last checkpoint, each attempt in a store of its own (README, "Several machines").
    crashed = launch("tests/crash.py", ["hipt_e2e.training.e2e:FoldTrainer.save", "3", str(REPO / "recipes" / "e2e.py"),
                                        *e2e_settings(shards, tmp_path / "restarted", *arguments)],
                     extra=["--max_restarts", "1", "--rdzv_backend", "c10d"],
                     env={"CRASH_RANK": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})
    assert crashed.returncode == 0, crashed.stderr[-3000:]
    assert "dying after call 3" in crashed.stderr and "resuming" in crashed.stderr.lower()
    for name in ("predictions.csv", "fold_0/train_log.jsonl", "fold_2/history.json"):
        assert (tmp_path / "whole" / name).read_text() == (tmp_path / "restarted" / name).read_text(), name


def test_the_slurm_script_on_two_nodes_writes_the_bytes_of_one_process(shards: Path, weights, tmp_path: Path) -> None:
    """embed_tiles through recipes/slurm.sh under a stand-in srun that starts its command once per "node"
    on this machine (two launchers, one process each), against one process."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\necho 127.0.0.1\necho 127.0.0.2\n")
    (bin_dir / "srun").write_text('#!/bin/bash\nshift\nfor node in 0 1; do SLURM_NODEID=$node "$@" & done\nwait -n && wait -n\n')
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    out = tmp_path / "grids"
    arguments = step_args("embed_tiles", shards, out, weights["tile"])
    assert run_step("embed_tiles", *arguments).returncode == 0
    one = files(out)
    shutil.rmtree(out)
    env = {**ONE_PROCESS, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "SLURM_NNODES": "2",
           "SLURM_JOB_NODELIST": "node[1-2]", "GPUS_PER_NODE": "1", "ACCELERATE_USE_CPU": "true",
           "MIXED_PRECISION": "no", "MAIN_PORT": str(free_port())}
    result = run(["bash", str(REPO / "recipes" / "slurm.sh"), str(REPO / "recipes" / "embed_tiles.py"), *arguments],
                 cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files(out) == one
