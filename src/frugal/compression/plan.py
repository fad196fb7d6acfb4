"""Refuse, before any work, what a model, a recipe and the requested formats cannot do together."""

from __future__ import annotations

from typing import Any

from frugal.compression import transforms
from frugal.config import Recipe
from frugal.load.blocks import check_group_fit, quantizable_linears


def check_plan(model: Any, recipe: Recipe, formats: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, a recipe the model's layers or the requested formats cannot take."""
    from frugal.exporters import check

    if recipe.gguf_type:
        from frugal.compression.engine import gguf_layer_types

        gguf_layer_types(model, recipe)  # every tensor must fit a GGML type
    else:
        by_scheme: dict = {}
        for name, lin in quantizable_linears(model, recipe.ignore).items():
            by_scheme.setdefault(recipe.scheme_for(name), {})[name] = lin
        for scheme, layers in by_scheme.items():
            check_group_fit(layers, scheme)
    for t in transforms.enabled(recipe):
        if t.check is not None:
            t.check(model, recipe)
    for fmt in formats:
        check(fmt, model, recipe)


