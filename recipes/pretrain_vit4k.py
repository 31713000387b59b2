"""DINO pretraining of the region encoder (ViT4K) on token grids streamed from embed_tiles shards,
with the region-level multi-crop (2 global 14 x 14 and 8 local 6 x 6 token crops, flips).

    accelerate launch recipes/pretrain_vit4k.py --config recipes/configs/pretrain_vit4k.yaml \
        data.shards=runs/grids out=runs/vit4k

Outputs in `out`: config.yaml, train_log.jsonl, checkpoint.pt (resume=true continues it exactly;
released DINO layout) and backbone.safetensors (the teacher's ViT4K) for embed_regions.
"""
import dataclasses
import sys

from hipt_e2e.data import RegionStream, load_manifest
from hipt_e2e.errors import run_main
from hipt_e2e.lineage import read_lineage
from hipt_e2e.models.bundle import region_architecture
from hipt_e2e.models.encoders import build_region_encoder, with_grid_width
from hipt_e2e.ssl import RegionMultiCrop
from hipt_e2e.training.dino import RegionPretraining, train_dino
from hipt_e2e.training.recipe import recipe_settings


def main(argv: list[str] | None = None) -> None:
    settings = recipe_settings(RegionPretraining, __doc__, argv, required=("out", "data.shards"))
    grids = read_lineage(settings.data.shards)
    settings = dataclasses.replace(settings, model=with_grid_width(settings.model, grids.geometry.width))
    data, crops = settings.data, settings.crops
    stream = RegionStream(data.shards, shuffle=data.shuffle, seed=settings.seed)
    multicrop = RegionMultiCrop(crops.global_size, crops.local_size, crops.n_local)
    regions = load_manifest(data.shards)["samples"]
    card = {"kind": "region_encoder", "architecture": region_architecture(settings.model),
            **grids.geometry.pixel_fields(), "lineage": grids.as_dict()}
    train_dino(settings, lambda drop_path_rate: build_region_encoder(settings.model, drop_path_rate), stream,
               multicrop, regions, card)


if __name__ == "__main__":
    sys.exit(run_main(main))
