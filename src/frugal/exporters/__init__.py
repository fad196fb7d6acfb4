"""Writers of on-disk formats. A format is one module with `write(compressed, directory)` plus one
entry here; a module may also define `check(model, recipe)`, which raises FrugalError before any
compression work when the format cannot hold what the recipe would produce for that model, and says
what it holds: `HOLDS_GGML = True` for GGML grids (recipe.gguf_type), `ONE_SCHEME = "why"` when it
cannot hold mixed precision (recipe.overrides), `HOLDS_EXPERTS = True` when it writes MoE experts. A
module's `engines(recipe, out)` lists the `Engine`s that run its output (a `refusal` where this recipe's
output cannot run there). The first entry is the default format."""

from __future__ import annotations

import importlib
from typing import NamedTuple


class Engine(NamedTuple):
    """An engine that runs a format's output: `key` (what --engine takes), display `name`, the command,
    `refusal` (why this recipe's output cannot run there; "" when it can) and `scale_dtype`, the scale
    storage it computes in (what --engine sets in the recommended recipe; "" keeps the recipe's)."""

    key: str
    name: str
    command: str
    refusal: str = ""
    scale_dtype: str = ""

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
    from frugal.load.experts import moe_layers

    experts = moe_layers(model)
    if experts and not getattr(module, "HOLDS_EXPERTS", False):
        raise FrugalError(f"--format {fmt}: MoE experts ({experts[0]}) are written by --format "
                          f"{', '.join(f for f in FORMATS if getattr(importlib.import_module(FORMATS[f]), 'HOLDS_EXPERTS', False))} "
                          f"only, for now")
    if hasattr(module, "check"):
        module.check(model, recipe)


def engines(fmt: str, recipe, out: str = "OUT") -> list[Engine]:
    """The `Engine`s that run a `fmt` output of `recipe` at `out` (the format's `engines`)."""
    module = importlib.import_module(FORMATS[fmt])
    return module.engines(recipe, out) if hasattr(module, "engines") else []


def engine_keys(recipe) -> list[str]:
    """Every engine some format runs in (what --engine takes), in format order."""
    keys = [e.key for fmt in FORMATS for e in engines(fmt, recipe)]
    return list(dict.fromkeys(keys))


def format_for_engine(key: str, recipe) -> str:
    """The first format whose output `key` runs (the format --engine picks when --format is not given)."""
    check_engine_known(key, recipe)
    return next(fmt for fmt in FORMATS if any(e.key == key for e in engines(fmt, recipe)))


def engine_scale_dtype(key: str, recipe) -> str:
    """The scale storage engine `key` computes in ("" when it has no preference)."""
    return next((e.scale_dtype for f in FORMATS for e in engines(f, recipe) if e.key == key and e.scale_dtype), "")


def recommended_for(key: str) -> dict:
    """The recommended recipe (frugal.config.recommended) with the scale storage engine `key` computes in;
    FrugalError for an unknown engine."""
    from frugal.config import Recipe, recommended

    d = recommended()
    check_engine_known(key, Recipe())
    d["storage"]["scale_dtype"] = engine_scale_dtype(key, Recipe()) or d["storage"]["scale_dtype"]
    return d


def check_engine_known(key: str, recipe) -> None:
    from frugal.errors import FrugalError

    if key not in engine_keys(recipe):
        raise FrugalError(f"--engine {key}: known engines are {', '.join(engine_keys(recipe))}")


def check_engine(fmt: str, recipe, key: str) -> None:
    """Fail (one FrugalError line) before any work when engine `key` cannot run `recipe` written as `fmt`."""
    from frugal.errors import FrugalError

    check_engine_known(key, recipe)
    rows = {e.key: e for e in engines(fmt, recipe)}
    if key not in rows:
        where = [f for f in FORMATS if any(e.key == key for e in engines(f, recipe))]
        raise FrugalError(f"--engine {key}: it does not read --format {fmt}; it reads {', '.join(where)}")
    if rows[key].refusal:
        raise FrugalError(f"--engine {key}: cannot run this {fmt} output: {rows[key].refusal}")


def default_format() -> str:
    """The format written when none is named."""
    return next(iter(FORMATS))


def ggml_format() -> str:
    """The format that holds GGML grids (what a recipe with gguf_type is written as)."""
    return next(f for f, m in FORMATS.items() if getattr(importlib.import_module(m), "HOLDS_GGML", False))
