"""`hipt-shards`: build, merge, verify, inspect and bench WebDataset shards of slides, images or .pt tensors."""
from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

from hipt_e2e.config import add_config_arguments, parse_override, resolve_config, save_config, setup_logging
from hipt_e2e.data.storage import configure
from hipt_e2e.errors import run_main
from shards.build import DEFAULTS, build, part_dir
from shards.inputs import KINDS
from shards.inspect_bench import bench, count_tables, mosaic
from shards.merge import merge
from shards.verify import verify

log = logging.getLogger("hipt-shards")

# flag -> (config key, type); flags override the config file, `key=value` overrides override both.
BUILD_FLAGS = {
    "--labels": ("labels", str), "--classes": ("classes", lambda s: s.split(",")),
    "--region-px": ("region_px", int), "--tile-px": ("tile_px", int), "--mpp": ("mpp", float),
    "--slide-mpp": ("slide_mpp", float), "--min-tissue": ("min_tissue", float),
    "--tissue-threshold": ("tissue_threshold", int), "--thumbnail-px": ("thumbnail_px", int),
    "--encoding": ("encoding", str), "--quality": ("quality", int), "--shard-bytes": ("shard_bytes", float),
    "--workers": ("workers", int), "--part": ("part", str), "--on-error": ("on_error", str),
    "--tiles-per-item": ("tiles_per_item", int),
    "--shuffle-seed": ("shuffle_seed", lambda s: None if s.lower() in ("none", "null") else int(s)),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipt-shards", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)

    build_cmd = commands.add_parser("build", help="inputs -> shards + manifest.json")
    build_cmd.add_argument("kind", choices=KINDS)
    build_cmd.add_argument("input", type=Path)
    build_cmd.add_argument("--out", type=Path, required=True)
    build_cmd.add_argument("--labels-from-folders", action="store_true", default=argparse.SUPPRESS)
    build_cmd.add_argument("--allow-upsample", action="store_true", default=argparse.SUPPRESS,
                           help="allow --mpp finer than a slide's own resolution by more than 1.25x")
    for flag, (key, kind) in BUILD_FLAGS.items():
        build_cmd.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS)
    add_config_arguments(build_cmd)

    commands.add_parser("merge", help="combine --part builds").add_argument("dir", type=Path)
    commands.add_parser("verify", help="re-hash and decode everything").add_argument("dir", help="folder or URL")
    inspect_cmd = commands.add_parser("inspect", help="counts per class and slide")
    inspect_cmd.add_argument("dir", help="folder or URL")
    inspect_cmd.add_argument("--mosaic", type=Path, help="write a PNG mosaic of sample regions")
    inspect_cmd.add_argument("--mosaic-count", type=int, default=16)
    bench_cmd = commands.add_parser("bench", help="decoded tiles/s of the tile stream")
    bench_cmd.add_argument("dir", help="folder or URL")
    bench_cmd.add_argument("--seconds", type=float, default=10.0)
    bench_cmd.add_argument("--workers", type=int, default=0)
    for command in ("verify", "inspect", "bench"):  # the commands that read a shard set, perhaps by URL
        commands.choices[command].add_argument(
            "--storage-option", action="append", default=[], type=_storage_option, metavar="KEY=VALUE",
            help="an fsspec option for s3:// gs:// ... URLs, the value read as YAML; repeatable: e.g. "
                 "endpoint_url=http://minio:9000 (S3 servers other than AWS), profile=NAME, anon=true")
    return parser


def _storage_option(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return parse_override(text)


def _run_build(args: argparse.Namespace) -> int:
    flags = {key: getattr(args, key) for key, _ in BUILD_FLAGS.values() if hasattr(args, key)}
    if hasattr(args, "labels_from_folders"):
        flags["labels_from_folders"] = True
    cfg = resolve_config(DEFAULTS, args.config)
    cfg.update(kind=args.kind, input=str(args.input), out=str(args.out), **flags)
    cfg = resolve_config(cfg, None, args.overrides)
    cfg["shard_bytes"] = int(cfg["shard_bytes"])
    out_dir = part_dir(Path(cfg["out"]), cfg["part"])
    manifest = build(cfg)
    save_config(cfg, out_dir, "build-config.yaml")  # after build: a refused run must not overwrite the record
    print(f"{manifest['inputs']} inputs = {manifest['written']} written + {manifest['n_skipped']} skipped; "
          f"{manifest['samples']} samples in {len(manifest['shards'])} shards -> {out_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value overrides may sit between flags, where argparse's positional matching cannot see them
    args, extra = parser.parse_known_args(argv)
    unknown = [arg for arg in extra if arg.startswith("-") or "=" not in arg or args.command != "build"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "build":
        args.overrides = args.overrides + extra
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    configure(storage_options=dict(getattr(args, "storage_option", [])))  # for bench's DataLoader workers too
    if args.command == "build":
        return _run_build(args)
    if args.command == "merge":
        manifest = merge(args.dir)
        print(f"merged {len(manifest['shards'])} shards, {manifest['samples']} samples -> {args.dir}/manifest.json")
    elif args.command == "verify":
        problems = verify(args.dir)
        for problem in problems:
            print(f"PROBLEM {problem}")
        print(f"verify {args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    elif args.command == "inspect":
        print(count_tables(args.dir))
        if args.mosaic:
            print(f"mosaic: {mosaic(args.dir, args.mosaic, args.mosaic_count)}")
    elif args.command == "bench":
        result = bench(args.dir, args.seconds, args.workers)
        print(f"{result['tiles']} tiles in {result['seconds']:.1f} s; {result['mb_per_s']:.1f} MB/s "
              f"compressed ({result['bytes_per_tile']:.0f} B/tile)")
        print(f"tiles/s: {result['tiles_per_s']:.1f}")
    return 0


cli = partial(run_main, main)  # the hipt-shards console script: user errors as one line

if __name__ == "__main__":
    sys.exit(cli())
