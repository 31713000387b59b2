"""The shard-building CLI package (`hipt-shards`, `python -m shards`)."""
