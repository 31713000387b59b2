"""Embed every region of a token-grid shard set (embed_tiles output) with ViT4K as one vector (192-d),
grouped per slide as [M, 192] with the regions' coordinates, written as slide-level shards (one sample
per slide; read them with hipt_e2e.embedding.read_slide_embeddings).

    accelerate launch recipes/embed_regions.py --config recipes/configs/embed_regions.yaml \
        data.shards=runs/grids model.weights=runs/vit4k/backbone.safetensors out=runs/slides
"""
import copy

from hipt_e2e.embedding import embed_regions
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
    "embed": {"regions_per_batch": 64, "mixed_precision": None, "shard_bytes": 1.0e9},
}


def main(argv: list[str] | None = None) -> None:
    cfg = recipe_config(DEFAULTS, __doc__, argv, required=("out", "data.shards"))
    with_grid_width(cfg["model"], cfg["data"]["shards"])
    encoder = load_encoder_weights(build_region_encoder(cfg["model"]), cfg["model"])
    embed = cfg["embed"]
    embed_regions(encoder, cfg["data"]["shards"], cfg["out"], settings=cfg,
                  regions_per_batch=embed["regions_per_batch"], workers=cfg["data"]["workers"],
                  shard_bytes=int(embed["shard_bytes"]), mixed_precision=embed["mixed_precision"])


if __name__ == "__main__":
    main()
