"""Storage dtype as a registered transform: every float parameter that stays unquantized is rounded to
`recipe.storage.dtype` (bfloat16 by default) before calibration, and again after a block's other steps
changed it (AWQ folds scales into norms, refinement tunes them); the weights the recipe quantizes reach
the quantizer unrounded (they are stored as codes and scales). Computation stays in the
model's dtype; the writers then store those tensors in the storage dtype without changing a value, so
the model frugal measured is the one in the file."""

from __future__ import annotations

import torch

from frugal.compression.inplace import assign
from frugal.compression.transforms.base import BlockContext, Place, Transform


@torch.no_grad()
def round_parameters(module: torch.nn.Module, dtype: torch.dtype, skip: frozenset[str] = frozenset()) -> None:
    """Round every float parameter of `module` (not on the meta device, not named in `skip`) to `dtype`'s
    values, keeping its own dtype; tied parameters are one object and are rounded once."""
    for name, p in module.named_parameters():
        if name in skip or not p.is_floating_point() or p.device.type == "meta" or p.dtype == dtype:
            continue
        assign(p, p.data.to(dtype).to(p.dtype))


def _to_quantize(module: torch.nn.Module, prefix: str, recipe) -> frozenset[str]:
    """Parameter names (relative to `module`, full name `prefix`) of the weights the recipe quantizes:
    they are stored as codes and scales, so they reach the quantizer as they are, unrounded."""
    from frugal.load.blocks import block_linears, quantizable_linears

    layers = block_linears(module, prefix, recipe.ignore) if prefix else quantizable_linears(module, recipe.ignore)
    cut = len(prefix) + 1 if prefix else 0
    return frozenset(f"{name[cut:]}.weight" for name in layers)


def _model(model: torch.nn.Module, recipe) -> None:
    round_parameters(model, recipe.storage_dtype(torch.float32), _to_quantize(model, "", recipe))


def _block_start(ctx: BlockContext) -> None:
    round_parameters(ctx.block, ctx.recipe.storage_dtype(torch.float32), _to_quantize(ctx.block, ctx.prefix, ctx.recipe))


def _after_quantize(ctx: BlockContext) -> None:
    cut = len(ctx.prefix) + 1
    quantized = frozenset(f"{name[cut:]}.weight" for name in ctx.quantized)  # held as codes and scales
    round_parameters(ctx.block, ctx.recipe.storage_dtype(torch.float32), quantized)


TRANSFORM = Transform(name="storage", summary="round what stays unquantized to the storage dtype (16-bit)",
                      enabled=lambda recipe: recipe.cast_dtype() is not None,
                      steps={Place.MODEL: _model, Place.BLOCK_START: _block_start, Place.AFTER_QUANTIZE: _after_quantize},
                      needs_calibration=False, listed=False)
