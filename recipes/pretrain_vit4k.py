"""DINO pretraining of the region encoder (ViT4K) on token grids streamed from embed_tiles shards,
with the region-level multi-crop (2 global 14 x 14 and 8 local 6 x 6 token crops, flips).

    accelerate launch recipes/pretrain_vit4k.py --config recipes/configs/pretrain_vit4k.yaml \
        data.shards=runs/grids out=runs/vit4k

Outputs in `out`: config.yaml, train_log.jsonl, checkpoint.pt (resume=true continues it exactly;
released DINO layout) and backbone.safetensors (the teacher's ViT4K) for embed_regions.
"""
import copy
import sys

from hipt_e2e.data import RegionStream, load_manifest
from hipt_e2e.errors import run_main
from hipt_e2e.lineage import read_lineage
from hipt_e2e.models.bundle import level_geometry
from hipt_e2e.ssl import RegionMultiCrop
from hipt_e2e.training import DINO_DEFAULTS, REGION_MODEL_DEFAULTS, build_region_encoder, recipe_config, train_dino, with_grid_width

DEFAULTS = {
    **DINO_DEFAULTS,
    "data": {"shards": None, "shuffle": 1000, "workers": 4},  # token-grid shards; regions in the shuffle buffer
    "model": copy.deepcopy(REGION_MODEL_DEFAULTS),
    "crops": {"global_size": 14, "local_size": 6, "n_local": 8},
}


def main(argv: list[str] | None = None) -> None:
    cfg = recipe_config(DEFAULTS, __doc__, argv, required=("out", "data.shards"))
    grids = read_lineage(cfg["data"]["shards"])
    with_grid_width(cfg["model"], grids.geometry.width)
    data, crops = cfg["data"], cfg["crops"]
    stream = RegionStream(data["shards"], shuffle=data["shuffle"], seed=cfg["seed"])
    multicrop = RegionMultiCrop(crops["global_size"], crops["local_size"], crops["n_local"])
    regions = load_manifest(data["shards"])["samples"]
    card = {"kind": "region_encoder", "architecture": level_geometry(cfg["model"], "region"),
            **grids.geometry.pixel_fields(), "lineage": grids.as_dict()}
    train_dino(cfg, lambda drop_path_rate: build_region_encoder(cfg["model"], drop_path_rate), stream, multicrop,
               regions, card)


if __name__ == "__main__":
    sys.exit(run_main(main))
