"""PMP, parallel-aware: per-shard masks, exact distributed top-k, early-bird discovery, update rule."""
