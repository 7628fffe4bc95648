"""cke-dist: distributed CPU training and inference for Llama-family models."""
