"""Quantization algorithms: pure functions over tensors, no hooks and no models."""
