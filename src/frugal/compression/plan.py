"""Refuse, before any work, what a model, a recipe and the requested formats cannot do together."""

from __future__ import annotations

import logging
from typing import Any

from frugal.compression import transforms
from frugal.config import Recipe
from frugal.errors import FrugalError
from frugal.load.blocks import check_group_fit, quantizable_linears

log = logging.getLogger(__name__)


def context_length(model: Any) -> int | None:
    """The longest sequence the model's positions take (config max_position_embeddings), None if unknown."""
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def check_sequence_length(model: Any, seq_len: int, option: str) -> None:
    """Refuse sequences longer than the model's context (one line naming the option)."""
    n = context_length(model)
    if n is not None and seq_len > n:
        raise FrugalError(f"{option} {seq_len}: longer than the model's context of {n} tokens "
                          f"(max_position_embeddings)")


def fit_groups(model: Any, recipe: Recipe) -> Recipe:
    """`recipe` with an override per layer whose input width its group size does not divide: the largest
    supported group size that does, else one scale per output channel (logged; recorded in the recipe and
    so in frugal.json). Unchanged with recipe.strict_groups (check_plan then refuses) or a GGUF target."""
    import dataclasses

    from frugal.config import LayerOverride
    from frugal.quant.options import SUPPORTED_GROUPS

    if recipe.strict_groups or recipe.gguf_type:
        return recipe
    extra = []
    for name, lin in quantizable_linears(model, recipe.ignore).items():
        scheme = recipe.scheme_for(name)
        if scheme.group_size == -1 or lin.in_features % scheme.group_size == 0:
            continue
        fits = [g for g in SUPPORTED_GROUPS if 0 < g < scheme.group_size and lin.in_features % g == 0]
        group = max(fits, default=-1)
        extra.append(LayerOverride(match=name, weights=dataclasses.replace(scheme, group_size=group)))
    if not extra:
        return recipe
    shown = ", ".join(f"{o.match} ({o.weights.group_size})" for o in extra[:4])
    log.warning("%d layers are narrower than or not a multiple of their group size and take another "
                "(-1: per channel): %s%s (recipe.strict_groups refuses instead)", len(extra), shown,
                f" and {len(extra) - 4} more" if len(extra) > 4 else "")
    return dataclasses.replace(recipe, overrides=tuple(extra) + tuple(recipe.overrides))


def check_plan(model: Any, recipe: Recipe, formats: tuple[str, ...] = (), calibration: Any = None) -> None:
    """Refuse, before any work, a recipe the model's layers, the calibration (a text's recipe.calibration
    .seq_len or a tensor's length) or the requested formats cannot take."""
    import torch

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
    if recipe.needs_calibration:
        length = calibration.shape[-1] if isinstance(calibration, torch.Tensor) else recipe.calibration.seq_len
        check_sequence_length(model, length, "--calib-len")
    for fmt in formats:
        check(fmt, model, recipe)


