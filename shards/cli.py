"""`hipt-shards`: build, merge, verify, inspect and bench WebDataset shards of slides, images or .pt tensors."""
from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

from hipt_e2e.config import HelpFormatter, add_config_arguments, parse_override, resolve_settings, save_config, setup_logging
from hipt_e2e.data.features import export_trident
from hipt_e2e.data.storage import configure
from hipt_e2e.errors import run_main
from shards.build import BuildSettings, build, part_dir
from shards.features import FeatureBuildSettings, build_features
from shards.inputs import FEATURES, KINDS
from shards.inspect_bench import bench, count_tables, mosaic
from shards.merge import merge
from shards.verify import verify

# flag -> (config key, type, help); flags override the config file, `key=value` overrides override both.
# Their help states the default in words where BuildSettings' is None.
BUILD_FLAGS = {
    "--labels": ("labels", str, "labels CSV: slide_id,label[,patient_id][,split] (default: none, unlabelled)"),
    "--classes": ("classes", lambda s: s.split(","), "class order, comma-separated (default: the sorted labels found)"),
    "--region-px": ("region_px", int, "region side in px at --mpp"),
    "--tile-px": ("tile_px", int, "tile side in px; divides --region-px"),
    "--mpp": ("mpp", float, "resolution the regions are read at, um/px"),
    "--slide-mpp": ("slide_mpp", float, "um/px of inputs whose metadata has no resolution or an implausible one "
                                        "(default: none, such inputs are refused)"),
    "--min-tissue": ("min_tissue", float, "least tissue fraction of a kept region"),
    "--tissue-threshold": ("tissue_threshold", int, "saturation (0-255) above which a pixel is tissue "
                                                    "(default: Otsu's threshold per slide)"),
    "--max-ink": ("max_ink", float, "most marker-ink fraction of a kept tile or region (blue, green, black)"),
    "--min-sharpness": ("min_sharpness", float, "tiles whose sharpness (variance of the Laplacian at 1 um/px) is "
                                                "below this get tissue 0 (default: off; see SHARDS/qc/sharpness.json)"),
    "--roi": ("roi", str, "folder of QuPath GeoJSON annotations, <slide_id>.geojson, that restrict tiling "
                          "(default: none, the whole slide)"),
    "--roi-exclude": ("roi_exclude", lambda s: tuple(s.split(",")), "annotation classes cut out of the ROI, "
                                                                     "comma-separated; the others include"),
    "--thumbnail-px": ("thumbnail_px", int, "side of the thumbnail tissue is detected on, px"),
    "--encoding": ("encoding", str, "region pixels as jpeg, png (lossless) or npy"),
    "--quality": ("quality", int, "JPEG quality"),
    "--shard-bytes": ("shard_bytes", float, "bytes per shard, roughly"),
    "--workers": ("workers", int, "processes reading inputs in parallel"),
    "--part": ("part", str, "build part i/n of the inputs (e.g. 0/4), joined by `hipt-shards merge` "
                            "(default: all inputs)"),
    "--on-error": ("on_error", str, "an unreadable input: fail (stop) or skip (recorded in the manifest)"),
    "--tiles-per-item": ("tiles_per_item", int, "pt inputs: tiles of a flat folder per work item"),
    "--shuffle-seed": ("shuffle_seed", lambda s: None if s.lower() in ("none", "null") else int(s),
                       "seed of the build order of the slides; none: sorted by slide id"),
}
# `build features` only; --labels, --classes, --part, --on-error, --shard-bytes, --shuffle-seed, --tile-px, --mpp
# and --slide-mpp too (the last three where the files record none)
FEATURE_FLAGS = {
    "--format": ("format", str, "features: the files' layout, trident, clam or stamp (default: trident)"),
    "--grid": ("grid", int, "features: tiles per region side (default: 16, HIPT's 4096 px regions of 256 px tiles)"),
    "--snap": ("snap", float, "features: move a tile this far off its slide's tile grid (a fraction of a tile) onto "
                              "it (default: 0, off-grid tiles are refused)"),
    "--encoder": ("encoder", str, "features: the encoder's name where the files record none (default: none)"),
    "--dtype": ("dtype", str, "features: float16 or float32 grids (default: float16)"),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hipt-shards", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages too")
    commands = parser.add_subparsers(dest="command", required=True)
    command = partial(commands.add_parser, formatter_class=HelpFormatter)

    build_cmd = command("build", help="inputs -> shards + manifest.json", description="inputs -> shards + manifest.json")
    build_cmd.add_argument("kind", choices=(*KINDS, FEATURES),
                           help="what the input folder holds: .pt tensors, images, slides or tile features (.h5)")
    build_cmd.add_argument("input", type=Path, help="folder of inputs (searched recursively)")
    build_cmd.add_argument("--out", type=Path, required=True, help="output folder of the shard set")
    build_cmd.add_argument("--labels-from-folders", action="store_true", default=argparse.SUPPRESS,
                           help="each input's label is the name of its folder (default: off)")
    build_cmd.add_argument("--allow-upsample", action="store_true", default=argparse.SUPPRESS,
                           help="allow --mpp finer than a slide's own resolution by more than 1.25x (default: off)")
    defaults = BuildSettings().to_mapping()
    for flag, (key, kind, text) in {**BUILD_FLAGS, **FEATURE_FLAGS}.items():
        shown = "" if "default:" in text else f" (default: {defaults[key]})"
        build_cmd.add_argument(flag, dest=key, type=kind, default=argparse.SUPPRESS, help=text + shown)
    add_config_arguments(build_cmd, example="encoding=png")

    command("merge", help="combine --part builds").add_argument("dir", type=Path, help="the --out of the parts")
    command("verify", help="re-hash and decode everything").add_argument("dir", help="shard set: folder or URL")
    inspect_cmd = command("inspect", help="counts per class and slide")
    inspect_cmd.add_argument("dir", help="shard set: folder or URL")
    inspect_cmd.add_argument("--mosaic", type=Path, help="write a PNG mosaic of sample regions to this file")
    inspect_cmd.add_argument("--mosaic-count", type=int, default=16, help="regions in the mosaic")
    bench_cmd = command("bench", help="decoded tiles/s of the tile stream")
    bench_cmd.add_argument("dir", help="shard set: folder or URL")
    bench_cmd.add_argument("--seconds", type=float, default=10.0, help="how long to read")
    bench_cmd.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    export_cmd = command("export", help="token grids -> one TRIDENT .h5 per slide")
    export_cmd.add_argument("dir", help="token-grid shard set (embed_tiles or build features): folder or URL")
    export_cmd.add_argument("--out", type=Path, required=True, help="folder of the .h5 files (SLIDE_ID.h5)")
    for command in ("verify", "inspect", "bench", "export"):  # the commands that read a shard set, perhaps by URL
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
    flags = {key: getattr(args, key) for key, _, _ in (*BUILD_FLAGS.values(), *FEATURE_FLAGS.values())
             if hasattr(args, key)}
    if hasattr(args, "labels_from_folders"):
        flags["labels_from_folders"] = True
    kind = FeatureBuildSettings if args.kind == FEATURES else BuildSettings  # a flag of the other kind: refused
    given = resolve_settings(kind, args.config, changes={
        "kind": args.kind, "input": str(args.input), "out": str(args.out), **flags})
    settings = resolve_settings(kind, None, args.overrides, base=given)
    settings = settings.with_changes(shard_bytes=int(settings.shard_bytes))
    out_dir = part_dir(Path(settings.out), settings.part)
    manifest = build_features(settings) if args.kind == FEATURES else build(settings)
    save_config(settings, out_dir, "build-config.yaml")  # after build: a refused run must not overwrite the record
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
    elif args.command == "export":
        print(f"{len(export_trident(args.dir, args.out))} slides in TRIDENT's layout -> {args.out}")
    elif args.command == "bench":
        result = bench(args.dir, args.seconds, args.workers)
        print(f"{result['tiles']} tiles in {result['seconds']:.1f} s; {result['mb_per_s']:.1f} MB/s "
              f"compressed ({result['bytes_per_tile']:.0f} B/tile)")
        print(f"tiles/s: {result['tiles_per_s']:.1f}")
    return 0


cli = partial(run_main, main)  # the hipt-shards console script: user errors as one line

if __name__ == "__main__":
    sys.exit(cli())
