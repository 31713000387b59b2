"""Embed every slide of a token-grid shard set (embed_tiles output, or tile features imported with
`hipt-shards build features`) with a pretrained slide encoder (hipt_e2e.models.slide_encoders: FEATHER,
CHIEF, ...) from its authors' local weights file, as one vector per slide: slide-bag shards of one row each,
for recipes/linear_probe.py and train_fc.py. Grids of another tile encoder than the slide encoder reads are
refused.

    python recipes/embed_slides.py --config recipes/configs/embed_slides.yaml model.slide_encoder=feather_uni_v2 \\
        model.weights=FEATHER_FILE data.shards=runs/grids out=runs/slide_embeddings
"""
import sys

from hipt_e2e.embedding import EmbedSlidesSettings, embed_slides
from hipt_e2e.errors import run_main
from hipt_e2e.models.slide_encoders import load_slide_encoder, slide_encoder_entry
from hipt_e2e.training.recipe import recipe_settings


def main(argv: list[str] | None = None) -> dict:
    settings = recipe_settings(EmbedSlidesSettings, __doc__, argv,
                               required=("out", "data.shards", "model.slide_encoder", "model.weights"))
    model = settings.model
    encoder, weights = load_slide_encoder(model.slide_encoder, model.weights)
    return embed_slides(encoder, slide_encoder_entry(model.slide_encoder), weights, settings.data.shards,
                        settings.out, settings=settings.to_mapping(), min_tile_tissue=settings.embed.min_tile_tissue)


if __name__ == "__main__":
    sys.exit(run_main(main))
