"""Llama-style GPT on megatron-core: layer specs, model chunks, W0 and shard placement."""
