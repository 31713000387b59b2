"""Embed every region of a token-grid shard set (embed_tiles output) with ViT4K as one vector (192-d),
grouped per slide as [M, 192] with the regions' coordinates, written as slide-level shards (one sample
per slide; read them with hipt_e2e.data.embeddings.read_slide_bags). With embed.level=tile there is no
region stage: each slide's bag holds all its tile embeddings [N, D] with their level-0 coordinates, for
train_wsi's abmil (attention-MIL over tiles, the standard baseline on foundation-model features).

    accelerate launch recipes/embed_regions.py --config recipes/configs/embed_regions.yaml \
        data.shards=runs/grids model.weights=runs/vit4k/backbone.safetensors out=runs/slides
"""
import copy
import sys

from hipt_e2e.embedding import embed_regions
from hipt_e2e.errors import SettingError, run_main
from hipt_e2e.lineage import encoder_record, read_lineage
from hipt_e2e.models.bundle import level_geometry
from hipt_e2e.training import (
    REGION_MODEL_DEFAULTS,
    WEIGHTS_DEFAULTS,
    build_region_encoder,
    load_encoder_weights,
    recipe_config,
    with_grid_width,
)

DEFAULTS = {
    "out": None,
    "data": {"shards": None, "workers": 2},
    "model": {**copy.deepcopy(REGION_MODEL_DEFAULTS), **WEIGHTS_DEFAULTS},
    # level: region (ViT4K embeddings, the HIPT path) | tile (every tile embedding of the slide, no region
    # stage: the bags of attention-MIL over tiles, the field's baseline; min_tile_tissue drops glass tiles)
    "embed": {"regions_per_batch": 64, "mixed_precision": None, "level": "region",
              "min_tile_tissue": 0.0},
}


def main(argv: list[str] | None = None) -> None:
    cfg = recipe_config(DEFAULTS, __doc__, argv, required=("out", "data.shards"))
    with_grid_width(cfg["model"], read_lineage(cfg["data"]["shards"]).geometry.width)
    embed = cfg["embed"]
    if embed["level"] not in ("region", "tile"):
        raise SettingError(f"embed.level must be region or tile, got {embed['level']!r}")
    encoder = load_encoder_weights(build_region_encoder(cfg["model"]), cfg["model"]) if embed["level"] == "region" else None
    record = encoder_record(level_geometry(cfg["model"], "region"), cfg["model"]["weights"]) if encoder else None
    embed_regions(encoder, cfg["data"]["shards"], cfg["out"], settings=cfg, region_encoder=record,
                  regions_per_batch=embed["regions_per_batch"], workers=cfg["data"]["workers"],
                  mixed_precision=embed["mixed_precision"],
                  min_tile_tissue=embed["min_tile_tissue"])


if __name__ == "__main__":
    sys.exit(run_main(main))
