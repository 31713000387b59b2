"""DINO pretraining of the tile encoder (ViT256, or a timm CNN with model.encoder=cnn) on tiles
streamed from region or tile shards.

    accelerate launch recipes/pretrain_vit256.py --config recipes/configs/pretrain_vit256.yaml \
        data.shards=SHARDS out=runs/vit256

Outputs in `out`: config.yaml, train_log.jsonl, checkpoint.pt (resume=true continues it exactly;
released DINO layout) and backbone.safetensors (the teacher's tile encoder) for embed_tiles.
"""
import sys

from hipt_e2e.data import TileStream
from hipt_e2e.data.streams import count_tiles
from hipt_e2e.errors import run_main
from hipt_e2e.lineage import read_lineage
from hipt_e2e.models.bundle import tile_architecture
from hipt_e2e.models.encoders import build_tile_encoder
from hipt_e2e.ssl import TileMultiCrop
from hipt_e2e.training.dino import TilePretraining, train_dino
from hipt_e2e.training.recipe import recipe_settings


def main(argv: list[str] | None = None) -> None:
    settings = recipe_settings(TilePretraining, __doc__, argv, required=("out", "data.shards"))
    data, crops = settings.data, settings.crops
    stream = TileStream(data.shards, min_tissue=data.min_tissue, shuffle=data.shuffle, seed=settings.seed)
    multicrop = TileMultiCrop(data.normalisation, crops.global_size, crops.local_size, crops.n_local,
                              crops.global_scale, crops.local_scale)
    # An epoch is one pass over the tiles; counting them reads every record once (set
    # train.steps_per_epoch to skip that on very large shard sets).
    tiles = 0 if settings.train.steps_per_epoch else count_tiles(data.shards, data.min_tissue)
    card = {"kind": "tile_encoder", "architecture": tile_architecture(settings.model), "normalisation": data.normalisation}
    if not isinstance(data.shards, (list, tuple)):  # a shard set (a list of shard files has no manifest to tell)
        # a tile encoder is trained on tiles: their size and resolution, not the regions they were cut from
        pixels = read_lineage(data.shards)
        card.update(tile_px=pixels.geometry.tile_px, mpp=pixels.geometry.mpp, lineage=pixels.as_dict())
    train_dino(settings, lambda drop_path_rate: build_tile_encoder(settings.model, drop_path_rate), stream, multicrop,
               tiles, card)


if __name__ == "__main__":
    sys.exit(run_main(main))
