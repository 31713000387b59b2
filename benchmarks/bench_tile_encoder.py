"""Tile-embedding throughput of `vit256` against the naive reference (tests/naive_hipt.py).

Same weights (O(1)-scaled random ones, not a near-zero init, so errors are representative), same
inputs, same process; timings are interleaved round by round so that load from other processes
hits every variant alike, and the best round is reported next to the median.

    python benchmarks/bench_tile_encoder.py --batch 32 --threads 2 [--compile] [--device cuda]
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the naive reference lives with the tests, in one place
sys.path.insert(0, str(REPO))

from naive_hipt import naive_vit256, random_weights  # noqa: E402

from hipt_e2e.models import vit256  # noqa: E402

log = logging.getLogger("bench_tile_encoder")


def _time(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine the CPU time is the
    steadier measure, since waiting for a core does not count."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{os.cpu_count()}-core {platform.machine()} CPU ({names[0] if names else platform.processor()})"


def _variants(args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    model = vit256().to(device).eval()
    weights = random_weights({k: tuple(v.shape) for k, v in model.state_dict().items()})
    model.load_state_dict(weights)
    weights = {k: v.to(device) for k, v in weights.items()}

    def bf16(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fn(x).float()
        return run

    variants = {
        "naive reference, float32": lambda x: naive_vit256(weights, x),
        "vit256, float32": model,
        "vit256, bf16 autocast": bf16(model),
    }
    if args.compile:
        compiled = torch.compile(model)
        variants["vit256 + torch.compile, float32"] = compiled
        variants["vit256 + torch.compile, bf16 autocast"] = bf16(compiled)
    return variants


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--px", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (compiles first)")
    parser.add_argument("--no-tf32", action="store_true", help="fp32 on a GPU without TF32 (for the error column)")
    args = parser.parse_args(argv)
    if args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    x = torch.rand(args.batch, 3, args.px, args.px, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1

    with torch.inference_mode():
        variants = _variants(args, device)
        outputs = {}
        for name, fn in variants.items():  # warm-up (and compilation)
            start = time.perf_counter()
            outputs[name] = fn(x)
            log.info("warm-up %s: %.1f s", name, time.perf_counter() - start)
        walls: dict[str, list[float]] = {name: [] for name in variants}
        cpus: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(args.rounds):
            for name, fn in variants.items():
                wall, cpu = _time(lambda fn=fn: fn(x), device)
                walls[name].append(wall)
                cpus[name].append(cpu)
            log.info("round %d wall s: %s", round_ + 1, {n: round(t[-1], 3) for n, t in walls.items()})

    naive = "naive reference, float32"
    reference, naive_wall, naive_cpu = outputs[naive], min(walls[naive]), min(cpus[naive])
    print(f"\n{args.batch} tiles of {args.px} px per call, {args.rounds} interleaved rounds, {_machine(device)}, "
          f"{args.threads} threads, torch {torch.__version__}\n")
    print("| variant | best wall s/batch | median wall s/batch | tiles/s (best wall) | speed-up vs naive, "
          "best wall | speed-up vs naive, CPU time | max abs err vs naive fp32 |")
    print("|---|---|---|---|---|---|---|")
    for name, wall in walls.items():
        error = (outputs[name].float() - reference).abs().max().item()
        print(f"| {name} | {min(wall):.3f} | {statistics.median(wall):.3f} | {args.batch / min(wall):.1f} | "
              f"{naive_wall / min(wall):.2f}x | {naive_cpu / min(cpus[name]):.2f}x | {error:.1e} |")


if __name__ == "__main__":
    main()
