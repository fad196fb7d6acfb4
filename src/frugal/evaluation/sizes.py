"""Bytes of models, checkpoints and compression jobs."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from frugal.config import WeightScheme


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters and buffers (tied tensors counted once)."""
    from frugal.exporters.hf import tensor_identity

    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):  # views of one storage (MoE experts) each count
        seen[tensor_identity(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def saved_bytes(directory: str | Path) -> int:
    """Bytes of the weight files of an output directory (safetensors, GGUF, ONNX or OpenVINO IR)."""
    patterns = ("*.safetensors", "*.gguf", "*.onnx", "*.onnx.data", "openvino_model.bin")
    files = [f for pat in patterns for f in Path(directory).glob(pat)]
    return sum(f.stat().st_size for f in files)


def compression_estimate(model: nn.Module, layers: dict[str, nn.Linear], scheme: WeightScheme,
                         samples: int, seq_len: int) -> dict[str, int]:
    """Output size and peak memory of compressing `layers` of a loaded `model` with GPTQ: the
    pre-flight estimate (frugal.compression.preflight.estimate_tensors) of its tensors, for models
    without safetensors headers to read."""
    from frugal.compression.preflight import estimate_model
    from frugal.config import Recipe

    est = estimate_model(model, Recipe(weights=scheme), samples, seq_len, set(layers))
    return {"output_bytes": est.output_bytes, "peak_bytes": est.in_memory_ram_bytes}
