"""hipt-e2e: HIPT for whole-slide images, from shards to staged and end-to-end training."""

__version__ = "0.1.0"
