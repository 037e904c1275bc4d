"""The host: reads checkpoints, walks decoder blocks, runs algorithms, writes outputs."""
