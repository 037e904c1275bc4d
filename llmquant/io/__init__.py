"""On-disk layouts: bit packing, safetensors shards, checkpoint formats."""
