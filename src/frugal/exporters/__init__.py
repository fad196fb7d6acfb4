"""Writers of on-disk formats. A format is one module with `write(compressed, directory)` plus one
entry here; a module may also define `check(model, recipe)`, which raises FrugalError before any
compression work when the format cannot hold what the recipe would produce for that model."""

from __future__ import annotations

import importlib

FORMATS = {
    "compressed-tensors": "frugal.exporters.compressed_tensors",
    "gptq": "frugal.exporters.gptq",
    "gguf": "frugal.exporters.gguf",
    "onnx": "frugal.exporters.onnx",
}


def writer(fmt: str):
    """The `write(compressed, directory)` function of a format."""
    from frugal.errors import FrugalError

    if fmt not in FORMATS:
        raise FrugalError(f"--format {fmt}: known formats are {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[fmt]).write


def check(fmt: str, model, recipe) -> None:
    """Fail early (one FrugalError line) if format `fmt` cannot hold `recipe` applied to `model`."""
    from frugal.errors import FrugalError

    writer(fmt)  # unknown format
    if getattr(recipe, "gguf_type", "") and fmt != "gguf":
        raise FrugalError(f"--format {fmt}: a recipe with gguf_type={recipe.gguf_type} rounds onto GGML grids, "
                          "which only --format gguf can hold")
    if fmt == "gptq" and getattr(recipe, "overrides", ()):
        raise FrugalError("--format gptq: a GPTQ checkpoint holds one scheme; mixed precision (recipe.overrides) "
                          "exports to compressed-tensors, gguf or onnx")
    module = importlib.import_module(FORMATS[fmt])
    if hasattr(module, "check"):
        module.check(model, recipe)
