"""Statistics passes: forward hooks, layer by layer (with the hidden-state carrier), torchrun shards, sequential
re-calibration, and the cache in front of them."""
