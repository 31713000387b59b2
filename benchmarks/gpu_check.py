"""The GPU check: every GPU figure of the project from one prepared command, within minutes.

    python benchmarks/gpu_check.py --out DIR                      # on the GPU machine, ~8 minutes on an H100/H200
    python benchmarks/gpu_check.py --out DIR --device cpu --tiny  # the dry run (a test in the suite)

Each part is one of the project's benchmark scripts (or the GPU tests) run as a subprocess with its own time
box; its printed table, last line, exit code and time go into DIR/gpu_check.json as soon as it finishes, so a
time-out or a crash loses only the part in flight. DIR/gpu_check.md holds the summary table for
docs/benchmarks.md. Parts:
  tile     vit256 tiles/s: naive reference vs fp32, bf16 (and torch.compile on a GPU), fp32 error vs naive
           with TF32 off (benchmarks/bench_tile_encoder.py)
  embed    staged embedding from JPEG shards of 4096 px regions: tiles/s including decode, decoded by CPU
           DataLoader workers vs on the GPU (data.decode=gpu), and the grids' difference (benchmarks/bench_embed.py)
  e2e      end-to-end training step at HIPT geometry: peak memory and s/step at 1-8 regions, per-region slope,
           regions per step in 80 GB, projected 100-region step (benchmarks/gpu_e2e_step.py; on the CPU the
           memory benchmark's tiny geometry)
  predict  hipt-predict on a generated slide: tiles/s against the tile encoder's forward-only tiles/s
           (benchmarks/bench_predict.py; 100 regions of 4096 px on a GPU)
  foundation  end-to-end step through UNI's ViT-L/16 (frozen / LoRA / last 2 blocks) at 1 and 2 regions of 4096 px:
           s/step and peak memory, per-region slope, regions in 80 GB, projected 100-region step
           (benchmarks/bench_foundation.py e2e)
  tests    the GPU tests (pytest -m gpu: nvJPEG vs CPU decoding, pinned memory, bf16 e2e with device decoding,
           FSDP2 on one GPU)
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hipt_e2e.io import atomic_write_json, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"


def parts(device: str, tiny: bool) -> dict[str, tuple[list[str], int]]:
    """Part name -> (command, time box in seconds)."""
    python = [sys.executable]
    if tiny:  # the plumbing on small inputs, seconds each
        return {
            "tile": ([*python, str(BENCH / "bench_tile_encoder.py"), "--device", device, "--batch", "2", "--rounds", "1",
                      "--no-tf32"], 120),
            "embed": ([*python, str(BENCH / "bench_embed.py"), "--preset", "tiny", "--regions", "4", "--rounds", "1"],
                      120),
            "e2e": ([*python, str(BENCH / "bench_e2e_memory.py"), "--preset", "tiny", "--region-px", "128",
                     "--regions", "1", "2", "--repeats", "1"], 120),
            "predict": ([*python, str(BENCH / "bench_predict.py"), "--preset", "tiny", "--regions", "16", "--rounds", "1"],
                        120),
            "foundation": ([*python, str(BENCH / "bench_foundation.py"), "e2e", "--encoder", "kaiko-vits16",
                            "--modes", "lora", "--region-tiles", "1", "--regions", "1", "2", "--device", device], 120),
            "tests": ([*python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests")], 120),
        }
    return {
        "tile": ([*python, str(BENCH / "bench_tile_encoder.py"), "--device", device, "--batch", "256", "--rounds", "5",
                  "--compile", "--no-tf32"], 100),
        "embed": ([*python, str(BENCH / "bench_embed.py"), "--preset", "hipt", "--regions", "48", "--distinct", "8",
                   "--workers", "8", "--regions-per-batch", "8", "--rounds", "2"], 90),
        "e2e": ([*python, str(BENCH / "gpu_e2e_step.py"), "--regions", "1", "2", "4", "8", "--gpu-gb", "80",
                 "--project", "100"], 120),
        "predict": ([*python, str(BENCH / "bench_predict.py"), "--preset", "hipt", "--regions", "100", "--rounds", "3"],
                    90),
        "foundation": ([*python, str(BENCH / "bench_foundation.py"), "e2e", "--encoder", "uni_v1", "--region-tiles", "16",
                        "--regions", "1", "2", "--memory-gb", "80"], 80),
        "tests": ([*python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(REPO / "tests")], 70),
    }


def run_part(command: list[str], limit_s: int) -> dict:
    """Run one part; keep its table (markdown lines), its last line, exit code and time."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    # its own session, so that a part past its time box goes with all it started (accelerate launch's workers)
    with subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as part:
        try:
            output, stderr = part.communicate(timeout=limit_s)
            code, error = part.returncode, stderr[-2000:] if part.returncode else ""
        except subprocess.TimeoutExpired:
            os.killpg(part.pid, signal.SIGKILL)
            output, code, error = part.communicate()[0], None, f"timed out after {limit_s} s"
    lines = [line for line in output.splitlines() if line.strip()]
    return {"command": " ".join(command[1:]), "exit_code": code, "seconds": round(time.perf_counter() - start, 1),
            "table": [line for line in lines if line.startswith("|")], "last_line": lines[-1] if lines else "",
            "error": error}


def summary(results: dict[str, dict]) -> str:
    rows = ["| part | result (last line) | s | status |", "|---|---|---|---|"]
    for name, result in results.items():
        status = "ok" if result["exit_code"] == 0 else (result["error"].splitlines() or ["failed"])[-1][:120]
        rows.append(f"| {name} | {result['last_line'][:160]} | {result['seconds']} | {status} |")
    tables = [f"\n### {name}\n\n" + "\n".join(result["table"]) for name, result in results.items() if result["table"]]
    return "\n".join(rows) + "\n" + "\n".join(tables) + "\n"


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the dry run: every part on small inputs")
    parser.add_argument("--parts", nargs="+", default=None, help="a subset of: tile embed e2e predict tests")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = parts(args.device, args.tiny)
    results: dict[str, dict] = {}
    for name in args.parts or list(chosen):
        command, limit_s = chosen[name]
        print(f"[gpu_check] {name}: {' '.join(command[1:])} (at most {limit_s} s)", flush=True)
        results[name] = run_part(command, limit_s)
        print(f"[gpu_check] {name}: exit {results[name]['exit_code']} in {results[name]['seconds']} s: "
              f"{results[name]['last_line']}", flush=True)
        atomic_write_json(args.out / "gpu_check.json", results)  # after every part: a time-out loses one part
        atomic_write_text(args.out / "gpu_check.md", summary(results))
    return results


if __name__ == "__main__":
    main()
