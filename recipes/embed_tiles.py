"""Embed every region of a shard set as a token grid [D, rows, cols] (D = 384 for ViT256, the entry's
width for a pretrained encoder: model.encoder=uni_v1 model.weights=UNI_FILE_OR_FOLDER), written as
new shards (one sample per region: its key, record and coordinates kept, the grid as `grid.npy`).

    accelerate launch recipes/embed_tiles.py --config recipes/configs/embed_tiles.yaml \
        data.shards=SHARDS model.weights=runs/vit256/backbone.safetensors out=runs/grids

Regions are batched, their tiles encoded together; processes and DataLoader workers split the work
by whole slides; the output manifest accounts for every input region.
"""
import sys

from hipt_e2e.embedding import embed_tiles
from hipt_e2e.errors import run_main
from hipt_e2e.lineage import encoder_record
from hipt_e2e.models.bundle import tile_architecture, tile_normalisation
from hipt_e2e.training import (
    TILE_MODEL_DEFAULTS,
    WEIGHTS_DEFAULTS,
    build_tile_encoder,
    load_encoder_weights,
    recipe_config,
)

DEFAULTS = {
    "out": None,
    "data": {"shards": None, "workers": 2, "decode": "cpu"},  # decode: cpu (readers) | gpu (nvJPEG, batched)
    "model": {**TILE_MODEL_DEFAULTS, **WEIGHTS_DEFAULTS},
    "embed": {
        # the released HIPT weights' (x/127.5 - 1); use what your weights were trained with (a pretrained
        # encoder of the registry always takes its own)
        "normalisation": "hipt",
        "regions_per_batch": 4,
        "tiles_per_call": 512,
        "dtype": "float16",  # of the stored grids: float16 | float32
        "mixed_precision": None,  # no | bf16 | fp16; null: as `accelerate launch` says
    },
}


def main(argv: list[str] | None = None) -> None:
    cfg = recipe_config(DEFAULTS, __doc__, argv, required=("out", "data.shards"))
    encoder = load_encoder_weights(build_tile_encoder(cfg["model"]), cfg["model"])
    embed, architecture = cfg["embed"], tile_architecture(cfg["model"])
    normalisation = tile_normalisation(architecture, embed["normalisation"])
    # a pretrained encoder keeps the {path, sha256} of the authors' file it loaded
    record = encoder_record(architecture, cfg["model"]["weights"], getattr(encoder, "weights", None), normalisation)
    embed_tiles(encoder, cfg["data"]["shards"], cfg["out"], settings=cfg, tile_encoder=record, normalisation=normalisation,
                regions_per_batch=embed["regions_per_batch"], tiles_per_call=embed["tiles_per_call"],
                workers=cfg["data"]["workers"], dtype=embed["dtype"],
                mixed_precision=embed["mixed_precision"], decode=cfg["data"]["decode"])


if __name__ == "__main__":
    sys.exit(run_main(main))
