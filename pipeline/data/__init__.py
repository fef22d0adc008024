"""Data path: shard discovery, per-rank readers, transforms."""
