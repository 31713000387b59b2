"""Embed every region of a shard set as a token grid [D, rows, cols] (D = 384 for ViT256, the entry's
width for a pretrained encoder: model.encoder=uni_v1 model.weights=UNI_FILE_OR_FOLDER), written as
new shards (one sample per region: its key, record and coordinates kept, the grid as `grid.npy`).

    accelerate launch recipes/embed_tiles.py --config recipes/configs/embed_tiles.yaml \
        data.shards=SHARDS model.weights=runs/vit256/backbone.safetensors out=runs/grids

Regions are batched, their tiles encoded together; processes and DataLoader workers split the work
by whole slides; the output manifest accounts for every input region.
"""
import sys

from hipt_e2e.embedding import EmbedTilesSettings, embed_tiles
from hipt_e2e.errors import run_main
from hipt_e2e.lineage import encoder_record
from hipt_e2e.models.bundle import tile_architecture, tile_normalisation
from hipt_e2e.models.encoders import build_tile_encoder, load_encoder_weights
from hipt_e2e.models.foundation import run_precision
from hipt_e2e.training.recipe import recipe_settings


def main(argv: list[str] | None = None) -> None:
    settings = recipe_settings(EmbedTilesSettings, __doc__, argv, required=("out", "data.shards"))
    model, embed = settings.model, settings.embed
    encoder = load_encoder_weights(build_tile_encoder(model), model)
    architecture = tile_architecture(model)
    normalisation = tile_normalisation(architecture, embed.normalisation)
    # a pretrained encoder keeps the {path, sha256} of the authors' file it loaded
    record = encoder_record(architecture, model.weights, getattr(encoder, "weights", None), normalisation)
    embed_tiles(encoder, settings.data.shards, settings.out, settings=settings.to_mapping(), tile_encoder=record,
                normalisation=normalisation, regions_per_batch=embed.regions_per_batch,
                tiles_per_call=embed.tiles_per_call, workers=settings.data.workers, dtype=embed.dtype,
                mixed_precision=run_precision(encoder, embed.mixed_precision), decode=settings.data.decode)


if __name__ == "__main__":
    sys.exit(run_main(main))
