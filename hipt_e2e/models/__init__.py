"""HIPT's three levels (tile ViT256 or a CNN, region ViT4K, slide transformer) and the nested model."""
from .checkpoint import CheckpointError, LoadResult, load_checkpoint, read_state_dict
from .cnn import CNNTileEncoder, cnn256
from .hipt import HIPT, HIPTAttention, token_grids, tokens_to_grid
from .presets import PRESETS, model_preset
from .slide import GatedAttentionPool, SlideTransformer, vit_wsi
from .vit import GridViT, RegionViT, TileViT, resize_pos_table, select_attention, vit4k, vit256

__all__ = [
    "CNNTileEncoder", "CheckpointError", "GatedAttentionPool", "GridViT", "HIPT", "HIPTAttention",
    "LoadResult", "PRESETS", "RegionViT", "SlideTransformer", "TileViT", "cnn256", "load_checkpoint",
    "model_preset", "read_state_dict", "resize_pos_table", "select_attention", "token_grids", "tokens_to_grid",
    "vit256", "vit4k", "vit_wsi",
]
