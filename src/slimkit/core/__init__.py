"""Core: affine quantization math, configs and their registry, graph capture, calling models."""
