"""Data: tiling, sources, the shard sample format and streaming readers."""
from hipt_e2e.data.manifest import load_manifest, shard_urls
from hipt_e2e.data.streams import RegionStream, SlideBagStream, TileStream
from hipt_e2e.data.tiling import RegionGeometry, cut_tiles, measure_tiles

__all__ = ["RegionGeometry", "RegionStream", "SlideBagStream", "TileStream", "cut_tiles", "load_manifest",
           "measure_tiles", "shard_urls"]
