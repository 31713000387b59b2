"""End-to-end training steps at HIPT's real geometry on one GPU: 4096 px regions (16 x 16 tiles of 256 px),
ViT-S/16 tile encoder -> ViT4K -> slide transformer, bf16 autocast, gradient checkpointing over chunks of
tiles and every ViT block; peak memory (torch.cuda.max_memory_allocated) and time per step.

    python benchmarks/gpu_e2e_step.py                      # 1, 2 and 4 regions per step, ~1 minute on an H100
    python benchmarks/gpu_e2e_step.py --regions 8 --plain  # also 1 region without checkpointing

The step is bench_e2e_memory.py's (forward, cross-entropy, backward, AdamW step), so the numbers compare
with its CPU figures; the per-region slope gives the regions per step that fit this GPU.
"""
from __future__ import annotations

import argparse
import logging

import torch
from bench_e2e_memory import measure, slope  # benchmarks/ is on the path when run as a script

from hipt_e2e.config import setup_logging
from hipt_e2e.models import HIPT

log = logging.getLogger("gpu_e2e_step")
GIB = 2 ** 30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--regions", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--region-px", type=int, default=4096)
    parser.add_argument("--chunk-size", type=int, default=64, help="tiles per tile-encoder call")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--plain", action="store_true", help="also one region without checkpointing")
    parser.add_argument("--gpu-gb", type=float, default=None, help="also the regions per step that fit this much memory")
    parser.add_argument("--project", type=int, default=100, help="project the step time of a slide of this many regions")
    args = parser.parse_args()
    setup_logging()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this script measures a GPU (benchmarks/bench_e2e_memory.py runs on CPUs)")
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.manual_seed(0)
    model = HIPT.from_preset("hipt", 2, chunk_size=args.chunk_size, checkpoint_chunks=True,
                             checkpoint_blocks=True).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    measure(model, optimizer, 1, args.region_px, torch.bfloat16, 1, device)  # warm-up: AdamW state, kernels
    tiles_per_region = (args.region_px // model.tile_px) ** 2
    rows = []
    for k in args.regions:
        rows.append(("checkpointing", k, measure(model, optimizer, k, args.region_px, torch.bfloat16, args.repeats,
                                                 device)))
        log.info("%s", rows[-1])
    if args.plain:
        model.set_grad_checkpointing(chunks=False, blocks=False)
        rows.append(("no checkpointing", 1, measure(model, optimizer, 1, args.region_px, torch.bfloat16,
                                                    args.repeats, device)))
    total = torch.cuda.get_device_properties(device).total_memory
    print(f"\n{torch.cuda.get_device_name(device)} ({total / GIB:.0f} GiB), {args.region_px} px regions "
          f"({tiles_per_region} tiles), ViT-S/16, bf16, chunk {args.chunk_size} tiles, torch {torch.__version__}\n")
    print("| mode | regions/step | tiles/step | peak GiB | s/step | tiles/s |")
    print("|---|---|---|---|---|---|")
    for mode, k, r in rows:
        print(f"| {mode} | {k} | {k * tiles_per_region} | {r['peak'] / GIB:.2f} | {r['seconds']:.3f} | "
              f"{r['tiles_per_s']:.0f} |")
    checkpointed = [(k, r["peak"]) for mode, k, r in rows if mode == "checkpointing"]
    if len(checkpointed) > 1:
        per_region, intercept = slope([k for k, _ in checkpointed], [p for _, p in checkpointed])
        # besides the peaks: what stays allocated between steps (parameters, AdamW's moments)
        fits = int((total - torch.cuda.memory_allocated() - intercept) // per_region)
        print(f"\nwith checkpointing: {per_region / GIB:.3f} GiB per added region, {intercept / GIB:.2f} GiB "
              f"besides -> about {fits} regions per step fit in this GPU's memory")
        if args.gpu_gb:
            budget = args.gpu_gb * 1e9 - torch.cuda.memory_allocated() - intercept
            print(f"in {args.gpu_gb:g} GB: about {int(budget // per_region)} regions per step")
        seconds, fixed = slope([k for k, _ in checkpointed],
                               [r["seconds"] for mode, _, r in rows if mode == "checkpointing"])
        print(f"{args.project}-region step ({args.project * tiles_per_region} tiles): projected "
              f"{fixed + seconds * args.project:.1f} s ({seconds:.3f} s per region)")


if __name__ == "__main__":
    main()
