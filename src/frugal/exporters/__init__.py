"""Writers of on-disk formats. A format is one module with `write(compressed, directory)` plus one
entry here; a module may also define `check(model, recipe)`, which raises FrugalError before any
compression work when the format cannot hold what the recipe would produce for that model, and says
what it holds: `HOLDS_GGML = True` for GGML grids (recipe.gguf_type), `ONE_SCHEME = "why"` when it
cannot hold mixed precision (recipe.overrides). The first entry is the default format."""

from __future__ import annotations

import importlib

FORMATS = {
    "compressed-tensors": "frugal.exporters.compressed_tensors",
    "gptq": "frugal.exporters.gptq",
    "gguf": "frugal.exporters.gguf",
    "onnx": "frugal.exporters.onnx",
    "openvino": "frugal.exporters.openvino",
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
    module = importlib.import_module(FORMATS[fmt])
    if getattr(recipe, "gguf_type", "") and not getattr(module, "HOLDS_GGML", False):
        raise FrugalError(f"--format {fmt}: a recipe with gguf_type={recipe.gguf_type} rounds onto GGML grids, "
                          f"which only --format {ggml_format()} can hold")
    if getattr(recipe, "overrides", ()) and getattr(module, "ONE_SCHEME", ""):
        raise FrugalError(f"--format {fmt}: {module.ONE_SCHEME}")
    if hasattr(module, "check"):
        module.check(model, recipe)


def engines(fmt: str, recipe, out: str) -> list[tuple[str, str]]:
    """(engine, command) pairs that run a `fmt` output of `recipe` at `out` (the format's `engines`)."""
    module = importlib.import_module(FORMATS[fmt])
    return module.engines(recipe, out) if hasattr(module, "engines") else []


def default_format() -> str:
    """The format written when none is named."""
    return next(iter(FORMATS))


def ggml_format() -> str:
    """The format that holds GGML grids (what a recipe with gguf_type is written as)."""
    return next(f for f, m in FORMATS.items() if getattr(importlib.import_module(m), "HOLDS_GGML", False))
