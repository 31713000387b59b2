"""Embed every region of a token-grid shard set (embed_tiles output) with ViT4K as one vector (192-d),
grouped per slide as [M, 192] with the regions' coordinates, written as slide-level shards (one sample
per slide; read them with hipt_e2e.data.embeddings.read_slide_bags). With embed.level=tile there is no
region stage: each slide's bag holds all its tile embeddings [N, D] with their level-0 coordinates, for
train_wsi's abmil (attention-MIL over tiles, the standard baseline on foundation-model features).

    accelerate launch recipes/embed_regions.py --config recipes/configs/embed_regions.yaml \
        data.shards=runs/grids model.weights=runs/vit4k/backbone.safetensors out=runs/slides
"""
import dataclasses
import sys

from hipt_e2e.embedding import EmbedRegionsSettings, embed_regions
from hipt_e2e.errors import run_main
from hipt_e2e.lineage import encoder_record, read_lineage
from hipt_e2e.models.bundle import region_architecture
from hipt_e2e.models.encoders import build_region_encoder, load_encoder_weights, with_grid_width
from hipt_e2e.training.recipe import recipe_settings


def main(argv: list[str] | None = None) -> None:
    settings = recipe_settings(EmbedRegionsSettings, __doc__, argv, required=("out", "data.shards"))
    model = with_grid_width(settings.model, read_lineage(settings.data.shards).geometry.width)
    settings, embed = dataclasses.replace(settings, model=model), settings.embed
    encoder = load_encoder_weights(build_region_encoder(model), model) if embed.level == "region" else None
    record = encoder_record(region_architecture(model), model.weights) if encoder else None
    embed_regions(encoder, settings.data.shards, settings.out, settings=settings.to_mapping(), region_encoder=record,
                  regions_per_batch=embed.regions_per_batch, workers=settings.data.workers,
                  mixed_precision=embed.mixed_precision, min_tile_tissue=embed.min_tile_tissue)


if __name__ == "__main__":
    sys.exit(run_main(main))
