"""Peak memory and speed of one end-to-end training step against regions per step, with and without
gradient checkpointing: the same HIPT model in the same process, configurations interleaved.

    python benchmarks/bench_e2e_memory.py                     # CPU: HIPT's models, 512 px regions (2 x 2 tiles)
    python benchmarks/bench_e2e_memory.py --region-px 4096    # a GPU with room for it

A step is forward (tile encoder -> ViT4K -> slide model on k uint8 regions of one slide), cross-entropy,
backward and an AdamW step, as hipt_e2e.training.e2e runs it. "checkpointing" = checkpoint_chunks and
checkpoint_blocks (chunks of `--chunk-size` tiles, every ViT block recomputed in backward).

Memory, two measures per step:
- peak: on CUDA torch.cuda.max_memory_allocated() minus the allocation before the step; on the CPU the
  peak resident set (VmHWM, reset through /proc/self/clear_refs before the step) minus the resident set
  before it. torch's CPU allocator does not cache, and glibc's mmap threshold is fixed at 64 KiB here, so
  every tensor of 64 KiB or more is mapped on allocation and unmapped when freed: the resident set
  follows the live tensors, including the transient ones (a chunk recomputed in backward, gradients).
- saved: the bytes autograd keeps for backward during the forward (unique storages passed to
  saved_tensors_hooks, parameters excluded): the activation bill that checkpointing cuts.
The extra memory per added region is the least-squares slope over k. The projection to HIPT's geometry
(4096 px regions = 256 tiles of 256 px, ViT-S/16) scales the measured per-tile slope to 256 tiles and
adds the region encoder's own slope on a 16 x 16 token grid, measured separately here.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hipt_e2e.config import setup_logging
from hipt_e2e.models import HIPT, model_preset, vit4k, vit_wsi

log = logging.getLogger("bench_e2e_memory")
MIB = 2 ** 20
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    """Peak bytes above the level at entry, within the block (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes = device, 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
            self.base = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.bytes = _proc_status_kib("VmHWM") * 1024 - self.base


@contextlib.contextmanager
def saved_bytes(model: torch.nn.Module, result: list[int]) -> Iterator[None]:
    """Append to `result` the bytes of the distinct non-parameter storages saved for backward in the block."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield
    result.append(sum(storages.values()))


def train_step(model: HIPT, optimizer: torch.optim.Optimizer, regions: torch.Tensor, dtype: torch.dtype | None,
               saved: list[int]) -> None:
    device = regions.device
    with saved_bytes(model, saved), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        logits = model(regions)
    F.cross_entropy(logits.float(), torch.tensor([1], device=device)).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(model: HIPT, optimizer: torch.optim.Optimizer, k: int, region_px: int, dtype: torch.dtype | None,
            repeats: int, device: torch.device) -> dict[str, float]:
    regions = torch.randint(0, 256, (k, 3, region_px, region_px), dtype=torch.uint8, device=device)
    peaks, saved, seconds, cpu_seconds = [], [], [], []
    for _ in range(repeats):
        with PeakMemory(device) as peak:
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(model, optimizer, regions, dtype, saved)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
        peaks.append(peak.bytes)
    tiles = k * (region_px // model.tile_px) ** 2
    return {"peak": min(peaks), "saved": saved[0], "seconds": min(seconds), "cpu_seconds": min(cpu_seconds),
            "tiles_per_s": tiles / min(seconds)}


def slope(ks: list[int], values: list[float]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of values against k."""
    fit = np.polyfit(np.array(ks, dtype=float), np.array(values, dtype=float), 1)
    return float(fit[0]), float(fit[1])


def region_encoder_slope(preset: str, grid: int, blocks: bool, device: torch.device) -> float:
    """Saved bytes per region of ViT4K + slide model alone on grid x grid token grids (forward only)."""
    geometry = model_preset(preset)
    region, slide = vit4k(**geometry["region"]).to(device), vit_wsi(2, **geometry["slide"]).to(device)
    region.set_grad_checkpointing(blocks)
    ks, saved = [1, 2, 4], []
    for k in ks:
        grids = torch.randn(k, geometry["region"]["in_dim"], grid, grid, device=device, requires_grad=True)
        with saved_bytes(region, saved):
            slide(region(grids))
    return slope(ks, saved)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="hipt")
    parser.add_argument("--region-px", type=int, default=512)
    parser.add_argument("--regions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--chunk-size", type=int, default=None,
                        help="tiles per tile-encoder call; default: one region's (so more regions = more chunks, "
                             "as at HIPT's geometry, where a region has 256 tiles)")
    parser.add_argument("--projection-chunk", type=int, default=64, help="chunk size assumed at HIPT's geometry")
    parser.add_argument("--repeats", type=int, default=2, help="steps per configuration (fastest and lowest kept)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--gpu-gb", type=float, default=80.0, help="GPU memory for the projection")
    args = parser.parse_args()
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    dtype = torch.bfloat16 if args.bf16 else None
    torch.manual_seed(0)
    tiles_per_region = (args.region_px // model_preset(args.preset)["tile_px"]) ** 2
    chunk_size = args.chunk_size or tiles_per_region
    model = HIPT.from_preset(args.preset, 2, chunk_size=chunk_size).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    modes = {"no checkpointing": False, "checkpointing": True}
    for checkpointing in modes.values():  # warm-up: allocates AdamW's state, first-call costs
        model.set_grad_checkpointing(chunks=checkpointing, blocks=checkpointing)
        measure(model, optimizer, 1, args.region_px, dtype, 1, device)
    results: dict[str, dict[int, dict[str, float]]] = {name: {} for name in modes}
    for k in args.regions:  # interleaved, so load from other jobs hits both alike
        for name, checkpointing in modes.items():
            model.set_grad_checkpointing(chunks=checkpointing, blocks=checkpointing)
            results[name][k] = measure(model, optimizer, k, args.region_px, dtype, args.repeats, device)
            log.info("%s, %d regions: %s", name, k, results[name][k])

    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n{args.preset} preset, {args.region_px} px regions ({tiles_per_region} tiles), chunk {chunk_size} "
          f"tiles, {'bf16' if dtype else 'fp32'}, {device.type} ({torch.get_num_threads()} threads), "
          f"{n_params / 1e6:.1f} M parameters\n")
    print("| mode | regions/step | tiles/step | peak MiB | saved MiB | s/step | CPU s/step | tiles/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in modes:
        for k, r in results[name].items():
            print(f"| {name} | {k} | {k * tiles_per_region} | {r['peak'] / MIB:.0f} | {r['saved'] / MIB:.1f} | "
                  f"{r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['tiles_per_s']:.2f} |")
    slopes = {name: {key: slope(args.regions, [r[key] for r in results[name].values()])[0] for key in ("peak", "saved")}
              for name in modes}
    print("\n| mode | extra peak MiB per region | extra saved MiB per region |")
    print("|---|---|---|")
    for name in modes:
        print(f"| {name} | {slopes[name]['peak'] / MIB:.1f} | {slopes[name]['saved'] / MIB:.2f} |")
    ratio = slopes["checkpointing"]["peak"] / slopes["no checkpointing"]["peak"]
    print(f"\nper-region peak slope with / without checkpointing: {ratio:.3f} (target <= 0.1)")

    # Projection to HIPT's geometry: 256 tiles per region and the region encoder on a 16 x 16 grid.
    scale = 256 / tiles_per_region
    grid = model_preset(args.preset)["region_tiles"]
    fixed = 16 * n_params  # fp32 parameters, gradients and AdamW's two moments
    print(f"\nprojection to {grid * model.tile_px} px regions ({grid} x {grid} tiles) on a {args.gpu_gb:.0f} GB GPU, "
          f"{'bf16' if dtype else 'fp32'} activations as measured:")
    print("| mode | per region GiB | fixed GiB | regions per step |")
    print("|---|---|---|---|")
    per_tile_plain = slopes["no checkpointing"]["peak"] / tiles_per_region
    for name, checkpointing in modes.items():
        per_region = scale * slopes[name]["peak"] + region_encoder_slope(args.preset, grid, checkpointing, device)
        # with checkpointing, backward recomputes one chunk at a time: at most a chunk's full activations
        transient = args.projection_chunk * per_tile_plain if checkpointing else 0.0
        budget = args.gpu_gb * 1e9 - fixed - transient
        print(f"| {name} | {per_region / 2**30:.3f} | {(fixed + transient) / 2**30:.2f} | "
              f"{int(budget // per_region)} |")


if __name__ == "__main__":
    main()
