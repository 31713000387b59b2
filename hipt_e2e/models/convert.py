"""`hipt-convert IN OUT.safetensors [--trusted]`: a released (or any) checkpoint -> safetensors.

Unpickles a released DINO checkpoint once (only with --trusted) and writes its teacher backbone, so that
later runs load it without unpickling anything.
"""
from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

from safetensors.torch import save_file

from ..config import HelpFormatter
from ..errors import run_main
from .checkpoint import read_state_dict

log = logging.getLogger("hipt_e2e.convert")


def convert(source: Path, target: Path, *, trusted: bool = False) -> int:
    """Write the backbone tensors of `source` to `target` (.safetensors); returns how many."""
    state = read_state_dict(source, trusted=trusted)
    # safetensors refuses views sharing storage; own contiguous copies are always accepted.
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(target),
              metadata={"source": source.name, "format": "pt"})
    return len(state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hipt-convert", description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("source", type=Path, help="checkpoint (.pth/.pt/.safetensors)")
    parser.add_argument("target", type=Path, help="output .safetensors file")
    parser.add_argument("--trusted", action="store_true",
                        help="allow full unpickling (needed by released DINO checkpoints); only for files you trust")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.target.suffix != ".safetensors":
        parser.error(f"target must end in .safetensors, got {args.target}")
    count = convert(args.source, args.target, trusted=args.trusted)
    log.info("wrote %d tensors to %s", count, args.target)
    return 0


cli = partial(run_main, main)  # the hipt-convert console script: user errors as one line

if __name__ == "__main__":
    sys.exit(cli())
