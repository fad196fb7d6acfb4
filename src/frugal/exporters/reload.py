"""A frugal compressed-tensors directory back as a `Compressed` result, so it can be written in
another format (`frugal export`, `frugal.export`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from frugal.compression.result import Compressed, CompressionReport, layer_reports
from frugal.config import Recipe
from frugal.errors import FrugalError
from frugal.load.compressed import read_compressed_tensors
from frugal.load.experts import expert_groups, quantized_from_checkpoint
from frugal.load.model import load_model


def load_compressed(directory: str | Path) -> Compressed:
    """A frugal compressed-tensors output directory back as a `Compressed` (for `frugal export`)."""
    directory = Path(directory)
    meta = directory / "frugal.json"
    if not (directory / "config.json").is_file() or not meta.is_file():
        raise FrugalError(f"{directory}: not a frugal compressed-tensors directory (needs config.json and frugal.json)")
    report = json.loads(meta.read_text())
    recipe = Recipe.from_dict(report["recipe"])
    if recipe.gguf_type:
        raise FrugalError(f"{directory}: compressed onto GGML grids ({recipe.gguf_type}); it exists only as GGUF")
    loaded = load_model(directory)
    quantized = read_compressed_tensors(directory)
    if expert_groups(loaded.model):  # MoE: the checkpoint's per-expert names back to frugal's
        quantized = quantized_from_checkpoint(loaded.model, quantized)
    if not quantized:
        raise FrugalError(f"{directory}: no packed weights found (was it written with --format compressed-tensors?)")
    modules = dict(loaded.model.named_modules())
    with torch.no_grad():  # frugal's arithmetic (float32), not the loader's (which may round in float16)
        for name, qw in quantized.items():
            modules[name].weight.data = qw.dequantize(modules[name].weight.dtype)
    rep = CompressionReport(recipe, report.get("source", str(directory)), report.get("calibration", {}),
                            layer_reports(report.get("layers", {})))
    return Compressed(model=loaded.model, tokenizer=loaded.tokenizer, quantized=quantized, report=rep)
