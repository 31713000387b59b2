"""Named model geometries: "hipt" is the published one (the default); "tiny" the same code with small numbers
for tests and the demo, its position tables smaller than the grid so that interpolation is exercised."""
from __future__ import annotations

import copy
from typing import Any

from hipt_e2e.errors import SettingError

PRESETS: dict[str, dict[str, Any]] = {
    "hipt": {
        "tile_px": 256,
        "region_tiles": 16,  # region = 16 x 16 tiles = 4096 px; for data pipelines, HIPT accepts any multiple
        "tile": {"patch_size": 16, "embed_dim": 384, "depth": 12, "num_heads": 6, "pos_grid": 14},
        "region": {"in_dim": 384, "embed_dim": 192, "depth": 6, "num_heads": 6, "pos_grid": 14},
        "slide": {"dim": 192, "depth": 2, "num_heads": 3},
    },
    "tiny": {
        "tile_px": 32,
        "region_tiles": 4,
        "tile": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3, "pos_grid": 3},
        "region": {"in_dim": 48, "embed_dim": 24, "depth": 2, "num_heads": 3, "pos_grid": 3},
        "slide": {"dim": 24, "depth": 2, "num_heads": 3},
    },
}


def model_preset(name: str = "hipt") -> dict[str, Any]:
    """A fresh copy of a named geometry: tile_px, region_tiles and kwargs for tile/region/slide models."""
    if name not in PRESETS:
        raise SettingError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])
