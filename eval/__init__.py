"""Evaluation: perplexity (and, later, throughput and memory) of original and quantized models."""
