"""Pretrained tile encoders: (1) embedding throughput of the embedding step vs the bare timm forward of the
same model, same precision and batch (goal >= 0.9); (2) an end-to-end training step through a ViT-L/16
(UNI's size) frozen / LoRA / last 2 blocks: seconds and peak memory per step at a few regions, with the
slope per region. Random weights (speed and memory do not depend on them).

    python benchmarks/bench_foundation.py embed --encoder kaiko-vitb16 --tiles 64
    python benchmarks/bench_foundation.py e2e --encoder uni_v1 --region-tiles 4 --regions 1 2

Each e2e setting runs in its own process, so peak RSS (CPU) or peak allocated memory (CUDA) is its own.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from hipt_e2e.data.tiling import cut_tiles
from hipt_e2e.models import HIPT, token_grids, vit4k, vit_wsi
from hipt_e2e.models.foundation import ENCODERS, PretrainedTileEncoder
from hipt_e2e.normalise import normalise


def _timed(fn, repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


@torch.no_grad()
def bench_embed(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    encoder = PretrainedTileEncoder(args.encoder, ENCODERS[args.encoder]).to(device).eval()
    side = int(args.tiles ** 0.5)
    regions = torch.randint(0, 256, (1, 3, side * 256, side * 256), dtype=torch.uint8, device=device)
    entry = encoder.entry
    # the bare forward gets tiles already resized and normalised, as a user of timm alone would feed them
    ready = encoder.prepare(normalise(cut_tiles(regions, 256).flatten(0, 1), entry.normalisation))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def ours() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            token_grids(encoder, regions, 256, entry.normalisation, tiles_per_call=args.tiles)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def bare() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            encoder.model.forward_features(ready)
        if device.type == "cuda":
            torch.cuda.synchronize()

    t_ours, t_bare = _timed(ours, args.repeats), _timed(bare, args.repeats)
    print(json.dumps({"encoder": args.encoder, "tiles": side * side, "precision": args.precision,
                      "embedding_step_tiles_per_s": round(side * side / t_ours, 2),
                      "bare_timm_tiles_per_s": round(side * side / t_bare, 2), "ratio": round(t_bare / t_ours, 3)}))


def e2e_step(encoder_name: str, mode: str, n_regions: int, region_tiles: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    entry = ENCODERS[encoder_name]
    tile = PretrainedTileEncoder(encoder_name, entry, trainable=2 if mode == "last2" else "all",
                                 lora_rank=8 if mode == "lora" else 0)
    model = HIPT(tile, vit4k(in_dim=entry.width), vit_wsi(3), tile_px=256, normalisation=entry.normalisation,
                 chunk_size=region_tiles ** 2, freeze_tile=mode == "frozen", checkpoint_chunks=True,
                 checkpoint_blocks=True).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    regions = torch.randint(0, 256, (n_regions, 3, region_tiles * 256, region_tiles * 256), dtype=torch.uint8,
                            device=device)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # GiB, after building
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(regions).logsumexp(-1).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    seconds = _timed(step, 1)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20)
    return {"mode": mode, "regions": n_regions, "tiles_per_region": region_tiles ** 2, "s_per_step": round(seconds, 2),
            "peak_GiB": round(peak, 2), "GiB_before_first_step": round(baseline, 2),
            "trainable_M": round(sum(p.numel() for p in params) / 1e6, 2)}


def bench_e2e(args: argparse.Namespace) -> None:
    rows = []
    for mode in args.modes:
        for n in args.regions:
            command = [sys.executable, __file__, "e2e-one", "--encoder", args.encoder, "--mode", mode, "--n", str(n),
                       "--region-tiles", str(args.region_tiles), "--device", args.device]
            rows.append(json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    for mode in args.modes:
        mine = [r for r in rows if r["mode"] == mode]
        if len(mine) > 1:
            first, last = mine[0], mine[-1]
            span = last["regions"] - first["regions"]
            seconds, memory = ((last[k] - first[k]) / span for k in ("s_per_step", "peak_GiB"))
            fixed = first["peak_GiB"] - memory * first["regions"]
            print(json.dumps({"mode": mode, "s_per_region": round(seconds, 2), "GiB_per_region": round(memory, 3),
                              f"regions_in_{args.memory_gb}GB": int((args.memory_gb - fixed) / memory) if memory > 0 else None,
                              "projected_s_100_regions": round(first["s_per_step"] + seconds * (100 - first["regions"]), 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    embed = sub.add_parser("embed")
    embed.add_argument("--encoder", default="kaiko-vitb16", choices=sorted(ENCODERS))
    embed.add_argument("--tiles", type=int, default=64, help="a square number: tiles of one region, in one call")
    embed.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    embed.add_argument("--repeats", type=int, default=3)
    embed.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e2e = sub.add_parser("e2e")
    e2e.add_argument("--encoder", default="uni_v1", choices=sorted(ENCODERS))
    e2e.add_argument("--modes", nargs="+", default=["frozen", "lora", "last2"])
    e2e.add_argument("--regions", nargs="+", type=int, default=[1, 2])
    e2e.add_argument("--region-tiles", type=int, default=4, help="tiles per region side (16: 4096 px regions)")
    e2e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e2e.add_argument("--memory-gb", type=int, default=80, help="the memory to fit regions into")
    one = sub.add_parser("e2e-one")
    one.add_argument("--encoder")
    one.add_argument("--mode")
    one.add_argument("--n", type=int)
    one.add_argument("--region-tiles", type=int)
    one.add_argument("--device")
    args = parser.parse_args()
    if args.what == "embed":
        bench_embed(args)
    elif args.what == "e2e":
        bench_e2e(args)
    else:
        print(json.dumps(e2e_step(args.encoder, args.mode, args.n, args.region_tiles, torch.device(args.device))))


if __name__ == "__main__":
    main()
