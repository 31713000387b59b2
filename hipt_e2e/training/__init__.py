"""Training engines behind the recipes: DINO at the tile and region levels, end-to-end and slide-level
training, the cross-validation fold loop and what runs it (rescoring, the colour baseline), checkpoints and exports."""
from hipt_e2e.models.encoders import (
    BACKBONE_EXPORT,
    RegionModel,
    RegionModelWithWeights,
    TileModel,
    TileModelWithWeights,
    build_region_encoder,
    build_tile_encoder,
    load_encoder_weights,
    with_grid_width,
)
from hipt_e2e.training.checkpointing import (
    CHECKPOINT,
    TRAIN_LOG,
    NonFiniteLossError,
    export_safetensors,
    load_checkpoint_state,
    save_checkpoint,
)
from hipt_e2e.training.data import EpochBatches, derived_seed
from hipt_e2e.training.dino import DINOSettings, DINOTrainer, RegionPretraining, TilePretraining, make_crops, train_dino
from hipt_e2e.training.recipe import recipe_settings

__all__ = [
    "BACKBONE_EXPORT", "CHECKPOINT", "DINOSettings", "DINOTrainer", "EpochBatches", "NonFiniteLossError",
    "TRAIN_LOG", "RegionModel", "RegionModelWithWeights",
    "RegionPretraining", "TileModel", "TileModelWithWeights", "TilePretraining",
    "build_region_encoder", "build_tile_encoder", "derived_seed", "export_safetensors",
    "load_checkpoint_state", "load_encoder_weights", "make_crops", "recipe_settings",
    "save_checkpoint", "train_dino", "with_grid_width",
]
