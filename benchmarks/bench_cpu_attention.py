"""Attention kernels for ViT tile encoders on CPUs: what `hipt_e2e.models.select_attention` chooses, measured.

    python benchmarks/bench_cpu_attention.py [--rounds 5] [--threads 2]

For two tile-encoder geometries (the lymphoma recipes' ViT, patch 8, 192-d, 4 blocks on 64 px tiles; HIPT's
ViT-S/16 on 256 px tiles) in bf16 autocast and in fp32, three ways of computing attention in the same
timm blocks: torch's fused scaled-dot-product kernel (timm's default), the same call forced onto torch's
math kernel (what training used before), and timm's explicit path (matmul, softmax, matmul). Each is timed
for a training step (forward, backward, AdamW) and a forward pass without gradients, the kernels taking
turns round by round so that the machine's drift hits all alike (median of --rounds). The bf16 rows also
give each kernel's relative error against fp32 on the same input, of the output and of the gradient of all
weights. The encoders are randomly initialised; with --weights (a lymphoma DINO backbone) and --shards (its
256 px region shards) the lymphoma ViT's errors are measured on trained weights and real tiles, where the
attention is sharper. Last line: the bf16 training step, explicit against fused and against math, at both
geometries.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from hipt_e2e.data import cut_tiles
from hipt_e2e.data.regions import ShardRegions
from hipt_e2e.models import TileViT, load_checkpoint
from hipt_e2e.normalise import normalise

GEOMETRIES = {  # name: (encoder settings, tile px, tiles per call)
    "lymphoma ViT (patch 8, 192-d, 4 blocks, 64 px)": (dict(patch_size=8, embed_dim=192, depth=4, num_heads=3,
                                                             pos_grid=7), 64, 96),
    "HIPT ViT-S/16 (384-d, 12 blocks, 256 px)": (dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), 256, 8),
}
KERNELS = ("fused", "math", "explicit")


def use_kernel(encoder: TileViT, kernel: str) -> contextlib.AbstractContextManager:
    for block in encoder.blocks:
        block.attn.fused_attn = kernel != "explicit"
    return sdpa_kernel([SDPBackend.MATH]) if kernel == "math" else contextlib.nullcontext()


def gradient(encoder: TileViT, tiles: torch.Tensor, bf16: bool) -> torch.Tensor:
    """All weights' gradient of a fixed loss, flattened (left in .grad for an optimizer step)."""
    encoder.zero_grad(set_to_none=True)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = encoder(tiles).float().pow(2).mean()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in encoder.parameters()])


def train_step(encoder: TileViT, optimizer: torch.optim.Optimizer, tiles: torch.Tensor, bf16: bool) -> None:
    gradient(encoder, tiles, bf16)
    optimizer.step()


@torch.no_grad()
def forward(encoder: TileViT, tiles: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        return encoder(tiles).float()


def real_tiles(shards: Path, tile_px: int, batch: int) -> torch.Tensor:
    """`batch` normalised tiles cut from the first regions of a shard set."""
    regions = ShardRegions(shards, regions_per_slide=2, seed=0)
    pixels = torch.cat([regions[regions.sample(slide, 0)]["pixels"] for slide in list(regions.slides)[:batch]])
    return normalise(cut_tiles(pixels, tile_px).flatten(0, 1)[:batch], "imagenet")


def measure(encoder: TileViT, tiles: torch.Tensor, bf16: bool, rounds: int) -> dict[str, dict[str, float]]:
    """tiles/s of a training step and of a forward pass per kernel, and (bf16) the errors against fp32."""
    batch = len(tiles)
    errors = errors_against_fp32(encoder, tiles) if bf16 else {}
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-6)  # tiny steps: the weights barely move
    times: dict[str, dict[str, list[float]]] = {k: {"train": [], "forward": []} for k in KERNELS}
    for round_ in range(rounds + 1):  # round 0 warms every kernel up
        for kernel in KERNELS:
            with use_kernel(encoder, kernel):
                for name, run in (("train", lambda: train_step(encoder, optimizer, tiles, bf16)),
                                  ("forward", lambda: forward(encoder, tiles, bf16))):
                    start = time.perf_counter()
                    run()
                    if round_:
                        times[kernel][name].append(time.perf_counter() - start)
    return {k: {**{name: batch / statistics.median(seconds) for name, seconds in v.items()}, **errors.get(k, {})}
            for k, v in times.items()}


def errors_against_fp32(encoder: TileViT, tiles: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each kernel's relative error under bf16 autocast against fp32: output and weights' gradient."""
    def relative(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    with use_kernel(encoder, "fused"):
        output, grad = forward(encoder, tiles, bf16=False), gradient(encoder, tiles, bf16=False)
    errors = {}
    for kernel in KERNELS:
        with use_kernel(encoder, kernel):
            errors[kernel] = {"error": relative(forward(encoder, tiles, bf16=True), output),
                              "grad_error": relative(gradient(encoder, tiles, bf16=True), grad)}
    encoder.zero_grad(set_to_none=True)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--weights", type=Path, help="lymphoma ViT weights (e.g. runs/lymphoma_s0/dino/backbone.safetensors)")
    parser.add_argument("--shards", type=Path, help="256 px region shards of 64 px tiles (e.g. runs/lymphoma_s0/shards256)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, torch {torch.__version__}, median of {args.rounds} rounds (tiles/s)")
    print("| geometry | precision | kernel | training step | forward only | rel. error vs fp32: output | gradient |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for n, (geometry, (settings, tile_px, batch)) in enumerate(GEOMETRIES.items()):
        torch.manual_seed(0)
        encoder = TileViT(**settings)
        tiles = torch.randn(batch, 3, tile_px, tile_px)
        if n == 0 and args.weights:
            load_checkpoint(encoder, args.weights)
        if n == 0 and args.shards:
            tiles = real_tiles(args.shards, tile_px, batch)
        for bf16 in (True, False):
            result = measure(encoder, tiles, bf16, args.rounds)
            for kernel, rates in result.items():
                errors = f"{rates['error']:.2e} | {rates['grad_error']:.2e}" if "error" in rates else " | "
                print(f"| {geometry} | {'bf16' if bf16 else 'fp32'} | {kernel} | {rates['train']:.1f} | "
                      f"{rates['forward']:.1f} | {errors} |", flush=True)
            if bf16:
                explicit = result["explicit"]["train"]
                summary.append(f"{geometry.split(' (')[0]}: {explicit / result['fused']['train']:.2f}x fused, "
                               f"{explicit / result['math']['train']:.2f}x math")
    print("bf16 training step, explicit attention against: " + "; ".join(summary))


if __name__ == "__main__":
    main()
