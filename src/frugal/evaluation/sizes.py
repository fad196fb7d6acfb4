"""Bytes of models, checkpoints and compression jobs."""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from frugal.config import WeightScheme


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's distinct parameters and buffers (tied tensors counted once)."""
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def saved_bytes(directory: str | Path) -> int:
    """Bytes of the weight files of an output directory (safetensors, GGUF or ONNX)."""
    files = [f for pat in ("*.safetensors", "*.gguf", "*.onnx", "*.onnx.data") for f in Path(directory).glob(pat)]
    return sum(f.stat().st_size for f in files)


def compression_estimate(model: nn.Module, layers: dict[str, nn.Linear], scheme: WeightScheme,
                         samples: int, seq_len: int) -> dict[str, int]:
    """Output size and peak memory of compressing `layers` of `model` with GPTQ."""
    total = model_bytes(model)
    linear = sum(l.weight.numel() * l.weight.element_size() for l in layers.values())
    quant = 0
    for l in layers.values():
        gs = l.in_features if scheme.group_size == -1 else scheme.group_size
        quant += l.weight.numel() * scheme.bits / 8 + l.weight.numel() / gs * l.weight.element_size()
    hidden = model.get_input_embeddings().weight.shape[1]
    acts = 2 * samples * seq_len * hidden * 4  # inputs and outputs of one block, float32
    widest = max(l.in_features for l in layers.values())
    hessians = 3 * widest * widest * 8  # accumulators and their float32 copies
    codes = sum(l.weight.numel() for l in layers.values())  # int8 codes kept for export
    return {"output_bytes": int(total - linear + quant), "peak_bytes": int(total + acts + hessians + codes)}
