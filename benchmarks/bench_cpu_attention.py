"""Attention kernels for ViT tile encoders on CPUs: what `hipt_e2e.models.select_attention` chooses, measured.

    python benchmarks/bench_cpu_attention.py [--rounds 5] [--threads 2]

For two tile-encoder geometries (the lymphoma recipes' ViT, patch 8, 192-d, 4 blocks on 64 px tiles; HIPT's
ViT-S/16 on 256 px tiles) in bf16 autocast and in fp32, three ways of computing attention in the same
timm blocks: torch's fused scaled-dot-product kernel (timm's default), the same call forced onto torch's
math kernel (what training used before), and timm's explicit path (matmul, softmax, matmul). Each is timed
for a training step (forward, backward, AdamW) and a forward pass without gradients, the kernels taking
turns round by round so that the machine's drift hits all alike (median of --rounds). The bf16 rows also
give each kernel's relative error against fp32 on the same input. Last line: the bf16 training step,
explicit against fused and against math, at both geometries.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from hipt_e2e.models import TileViT

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


def train_step(encoder: TileViT, optimizer: torch.optim.Optimizer, tiles: torch.Tensor, bf16: bool) -> None:
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = encoder(tiles).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def forward(encoder: TileViT, tiles: torch.Tensor, bf16: bool) -> torch.Tensor:
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        return encoder(tiles).float()


def measure(settings: dict, tile_px: int, batch: int, bf16: bool, rounds: int) -> dict[str, dict[str, float]]:
    """tiles/s of a training step and of a forward pass per kernel, and (bf16) the error against fp32."""
    torch.manual_seed(0)
    encoder = TileViT(**settings)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-6)  # tiny steps: the weights barely move
    tiles = torch.randn(batch, 3, tile_px, tile_px)
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
    result = {k: {name: batch / statistics.median(seconds) for name, seconds in v.items()} for k, v in times.items()}
    if bf16:
        with use_kernel(encoder, "fused"):
            reference = forward(encoder, tiles, bf16=False)
        for kernel in KERNELS:
            with use_kernel(encoder, kernel):
                error = (forward(encoder, tiles, bf16=True) - reference).norm() / reference.norm()
            result[kernel]["error"] = error.item()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{args.threads} threads, torch {torch.__version__}, median of {args.rounds} rounds (tiles/s)")
    print("| geometry | precision | kernel | training step | forward only | rel. error vs fp32 |")
    print("|---|---|---|---|---|---|")
    summary = []
    for geometry, (settings, tile_px, batch) in GEOMETRIES.items():
        for bf16 in (True, False):
            result = measure(settings, tile_px, batch, bf16, args.rounds)
            for kernel, rates in result.items():
                error = f"{rates['error']:.2e}" if "error" in rates else ""
                print(f"| {geometry} | {'bf16' if bf16 else 'fp32'} | {kernel} | {rates['train']:.1f} | "
                      f"{rates['forward']:.1f} | {error} |", flush=True)
            if bf16:
                explicit = result["explicit"]["train"]
                summary.append(f"{geometry.split(' (')[0]}: {explicit / result['fused']['train']:.2f}x fused, "
                               f"{explicit / result['math']['train']:.2f}x math")
    print("bf16 training step, explicit attention against: " + "; ".join(summary))


if __name__ == "__main__":
    main()
